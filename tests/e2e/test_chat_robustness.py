"""The chat page against what the network and its users can throw at it: hostile names and
data, two devices of one user, reloads and renames, a node draining under it, a cluster that
needs a token, a narrow screen and a keyboard. Real nodes, Debian's Chromium."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.cluster.conftest import Cluster
from tests.cluster.wsclient import WS
from tests.e2e.conftest import artifacts_dir
from tests.e2e.pages import (
    WAIT,
    conv_item,
    expect,
    join,
    logged_in,
    messages,
    new_page,
    online_item,
    open_conv,
    open_page,
    send,
)

pytestmark = pytest.mark.timeout(120)

EVIL = '<img src=x onerror="window.pwned=1">'
SECRET = "e2e-secret-0123456789abcdef0123456789"


def welcome_of(page: Any) -> dict[str, Any]:
    """The last welcome this page received (from the frames Playwright saw)."""
    frames: list[dict[str, Any]] = [json.loads(f) for f in page.frames_in if '"welcome"' in f]
    return frames[-1]


async def no_horizontal_overflow(page: Any, selector: str = "html") -> None:
    sizes = await page.eval_on_selector(selector, "e => [e.scrollWidth, e.clientWidth]")
    assert sizes[0] <= sizes[1], f"{selector} overflows: {sizes}"


async def test_network_text_stays_text_and_wraps(cluster: Any, browser: Any, unique: str) -> None:
    alice = f"alice{unique}"
    a = await open_page(browser, cluster.nodes[0].http_url + "/", alice)
    room = f"{EVIL[:20]}{unique}"
    await join(a, room)
    names = {
        "evil": f"{EVIL}{unique}",
        "long": f"{unique}{'x' * 120}",  # 128 characters, none to break at
        "rtl": f"\u202ertl{unique}",  # a right-to-left override that is never closed
        "quotes": f"q'\"\\&<>{unique}",
    }
    peers = {k: await WS.open(cluster.nodes[1].ws_url, uid) for k, uid in names.items()}
    for ws in peers.values():
        await ws.ok({"type": "join", "group": room})
    notes = messages(a).filter(has_text="joined the room")
    await expect(notes).to_have_count(len(names), timeout=WAIT)
    # a name is isolated (bidi): an unclosed override in it cannot reorder the words after it
    rtl_note = a.locator("#messages .msg.note bdi").filter(has_text=names["rtl"])
    await expect(rtl_note).to_have_count(1)

    evil = peers["evil"]
    values = [EVIL, 5, [1, EVIL], None, {"a": {"b": [EVIL]}}, {"text": EVIL}, {"text": 5},
              "y" * 3000, True]  # fmt: skip
    for data in values:
        await evil.ok({"type": "send", "to": f"group:{room}", "data": data})
    shown = ['<img src=x onerror="window.pwned=1">', "5", '[1,"<img', "null", '{"a":{"b":[',
             '{"text":5}', "yyyyyyyy", "true"]  # fmt: skip
    for text in shown:
        await expect(messages(a).filter(has_text=text).first).to_be_visible(timeout=WAIT)
    client_id = welcome_of(a)["client_id"]
    await evil.ok({"type": "send", "to": f"client:{client_id}", "data": {"text": f"to {EVIL}"}})
    await peers["long"].ok({"type": "send", "to": f"uid:{alice}", "data": "from the long name"})
    await peers["rtl"].ok({"type": "send", "to": f"uid:{alice}", "data": "\u202eunclosed"})
    await evil.ok({"type": "send", "to": "all", "data": {"text": EVIL * 20}})

    # a private message addressed to this connection is a private chat with its sender
    await open_conv(a, f"dm:{names['evil']}")
    await expect(messages(a).last).to_contain_text(f"to {EVIL}")
    # the longest name fits: the title wraps instead of pushing the page sideways
    await open_conv(a, f"dm:{names['long']}")
    await expect(messages(a).last).to_contain_text("from the long name")
    for selector in ("html", ".pane-head", "aside", "#messages"):
        await no_horizontal_overflow(a, selector)
    await open_conv(a, f"dm:{names['rtl']}")
    await expect(a.locator("#messages .msg bdi").filter(has_text="\u202eunclosed")).to_have_count(1)
    # the broadcast shows as a toast that never covers the message being typed
    toast = a.locator("#toast")
    await expect(toast).to_contain_text("broadcast from", timeout=WAIT)
    toast_box, compose_box = await toast.bounding_box(), await a.locator("#compose").bounding_box()
    assert toast_box["y"] + toast_box["height"] <= compose_box["y"], (toast_box, compose_box)
    await open_conv(a, "system")
    await expect(messages(a).last).to_contain_text(EVIL)

    assert await a.locator("img, #messages b").count() == 0
    assert await a.evaluate("window.pwned") is None
    await a.screenshot(path=str(artifacts_dir() / "hostile-input.png"), full_page=True)

    # a busy room: the open conversation keeps its last 500 messages in the page, not all
    await open_conv(a, f"room:{room}")
    for ws in peers.values():  # out of the room: they would not read the flood
        await ws.ok({"type": "leave", "group": room})
    for i in range(520):
        frame = {"type": "send", "to": f"group:{room}", "data": f"flood {i}"}
        await evil.send_raw(json.dumps(frame))
    await expect(messages(a).last).to_have_text(re.compile("flood 519"), timeout=WAIT)
    assert await messages(a).count() == 500
    assert a.errors == []


async def test_two_devices_of_one_user(cluster: Any, browser: Any, unique: str) -> None:
    sam, bea, room = f"sam{unique}", f"bea{unique}", f"devices{unique}"
    s1 = await open_page(browser, cluster.nodes[0].http_url + "/", sam)
    s2 = await open_page(browser, cluster.nodes[1].http_url + "/", sam)
    b = await open_page(browser, cluster.nodes[2].http_url + "/", bea)
    for page in (s1, s2, b):
        await join(page, room)
    info = b.locator("#conv-info")
    await expect(info).to_have_text("2 people, 3 connections", timeout=WAIT)
    await expect(online_item(b, sam)).to_have_count(1)  # one user, listed once

    # a private message to sam reaches both of sam's tabs
    await online_item(b, sam).click()
    await send(b, "hello both of you")
    for page in (s1, s2):
        await open_conv(page, f"dm:{bea}")
        await expect(messages(page).last).to_contain_text("hello both of you", timeout=WAIT)

    # one tab closes: sam is still online and still in the room; nobody is told he left
    await s1.context.close()
    await open_conv(b, f"room:{room}")
    await expect(info).to_have_text("2 people, 2 connections", timeout=WAIT)
    await expect(online_item(b, sam)).to_have_count(1)
    await expect(messages(b).filter(has_text="left the room")).to_have_count(0)
    await send(b, "still here?")
    await open_conv(s2, f"room:{room}")
    await expect(messages(s2).filter(has_text="still here?")).to_have_count(1, timeout=WAIT)
    assert s2.errors == b.errors == []


async def test_reload_rename_leave(cluster: Any, browser: Any, unique: str) -> None:
    first, second, peer = f"first{unique}", f"second{unique}", f"peer{unique}"
    r1, r2, r3 = (f"{n}-{unique}" for n in ("one", "two", "three"))
    base = cluster.nodes[0].http_url + "/"
    p = await new_page(browser, f"{base}?name={first}")
    await logged_in(p, first)
    assert p.url == base  # ?name= is taken out of the address: a reload uses the latest name
    for room in (r1, r2):
        await join(p, room)
    q = await open_page(browser, cluster.nodes[1].http_url + "/", peer)
    await join(q, r2)

    # a reload logs in again and re-joins both rooms
    await p.reload()
    await logged_in(p, first)
    for room in (r1, r2):
        await expect(conv_item(p, f"room:{room}")).to_have_count(1, timeout=WAIT)
    await open_conv(p, f"room:{r2}")
    await send(q, "after the reload")
    await expect(messages(p).filter(has_text="after the reload")).to_have_count(1, timeout=WAIT)

    # leave a room: gone, and gone after a reload too; its messages no longer arrive
    await open_conv(p, f"room:{r1}")
    await p.click("#leave-btn")
    await expect(conv_item(p, f"room:{r1}")).to_have_count(0)
    await p.reload()
    await logged_in(p, first)
    await expect(conv_item(p, f"room:{r2}")).to_have_count(1, timeout=WAIT)
    await expect(conv_item(p, f"room:{r1}")).to_have_count(0)

    # change name: a new user, no rooms, nothing stale; the old name's messages stop
    await p.click("#logout-btn")
    await expect(p.locator("#login-form")).to_be_visible()
    await p.fill("#name", second)
    await p.press("#name", "Enter")
    await logged_in(p, second)
    await expect(p.locator("#convs li")).to_have_count(1)  # the lobby
    await expect(online_item(q, first)).to_have_count(0, timeout=WAIT)
    await expect(online_item(p, second)).to_have_count(1, timeout=WAIT)
    await expect(online_item(p, first)).to_have_count(0)
    old = await WS.open(cluster.nodes[2].ws_url, f"sender{unique}")
    await old.ok({"type": "send", "to": f"uid:{first}", "data": "to the old name"})
    await old.ok({"type": "send", "to": f"uid:{second}", "data": "to the new name"})
    await open_conv(p, f"dm:sender{unique}")
    await expect(messages(p).last).to_contain_text("to the new name", timeout=WAIT)
    await expect(messages(p).filter(has_text="to the old name")).to_have_count(0)
    await join(p, r3)
    await p.reload()
    await logged_in(p, second)  # not the ?name= the page was first opened with
    await expect(conv_item(p, f"room:{r3}")).to_have_count(1, timeout=WAIT)
    await expect(conv_item(p, f"room:{r2}")).to_have_count(0)

    # switch to another node's own port (another origin): name and rooms go along in the URL
    target = f"{cluster.nodes[2].http_url}/"
    await expect(p.locator(f'#node-select option[value="{target}"]')).to_have_count(1, timeout=WAIT)
    await p.select_option("#node-select", target)
    await expect(p.locator("#node")).to_have_text(re.compile("^node2-"), timeout=WAIT)
    await logged_in(p, second)
    await expect(conv_item(p, f"room:{r3}")).to_have_count(1, timeout=WAIT)
    assert p.url == target  # ?name= and ?rooms= are taken out of the address
    assert p.errors == q.errors == []


async def test_drain_moves_pages_to_another_node(
    valkey: Any, make_cluster: Any, nginx_factory: Any, browser: Any, unique: str
) -> None:
    cluster = make_cluster(valkey.url, 2, ["--drain-timeout", "2", "--node-heartbeat", "0.5"])
    nginx = nginx_factory([f"127.0.0.1:{n.port}" for n in cluster.nodes])
    room = f"drain{unique}"
    direct = await open_page(browser, cluster.nodes[0].http_url + "/", f"direct{unique}")
    pinned = await open_page(browser, f"{nginx.url}/n/1/", f"pinned{unique}")
    other = await open_page(browser, cluster.nodes[1].http_url + "/", f"other{unique}")
    # the page served by node 0 learns the other node from /nodes.json (its fallback)
    await expect(direct.locator("#node-select option")).to_have_count(2, timeout=WAIT)
    for page in (direct, pinned, other):
        await join(page, room)
    for page in (direct, pinned):
        await expect(page.locator("#node")).to_have_text(re.compile("^node0-"))

    assert await asyncio.to_thread(cluster.nodes[0].terminate) == 0  # SIGTERM: a drain
    for page in (direct, pinned):
        await expect(page.locator("#node")).to_have_text(re.compile("^node1-"), timeout=WAIT)
        await expect(page.locator("#conn-state")).to_have_text("connected", timeout=WAIT)
        active = page.locator("#convs li.active")
        await expect(active).to_have_attribute("data-conv", f"room:{room}")
        notes = messages(page).filter(has_text="connection lost")
        await expect(notes).to_have_count(1)  # one drop: one note, not one per failed attempt
        await expect(notes).to_have_text(re.compile(r"\(1012\)"))
        back = messages(page).filter(has_text="reconnected, now on node node1-")
        await expect(back).to_have_count(1)
    await send(other, "after the drain")
    await send(direct, "direct is back")
    await send(pinned, "pinned is back")
    for page in (direct, pinned, other):
        for text in ("after the drain", "direct is back", "pinned is back"):
            await expect(messages(page).filter(has_text=text)).to_have_count(1, timeout=WAIT)
    assert direct.errors == pinned.errors == other.errors == []


def token(sub: str, ttl: float = 600) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl}, SECRET, algorithm="HS256")


@pytest.fixture
def jwt_cluster(valkey: Any, tmp_path: Path) -> Iterator[Cluster]:
    """One node as production runs it: JWT, and only its own page's origin allowed."""
    cluster = Cluster(valkey.url, 1, tmp_path, ["--jwt-secret", SECRET])
    node = cluster.nodes[0]
    node.args = [*node.args, "--allowed-origins", node.http_url]
    cluster.start()
    yield cluster
    cluster.stop()


async def test_page_on_a_jwt_cluster(jwt_cluster: Cluster, browser: Any, unique: str) -> None:
    cluster = jwt_cluster
    base = cluster.nodes[0].http_url + "/"
    # no token: the page says that this cluster needs one (it does not retry for minutes)
    p = await new_page(browser, base)
    form = p.locator("#token-form")
    await expect(form).to_be_visible(timeout=WAIT)
    await expect(form).to_contain_text("needs a token")
    await expect(p.locator("#login-form")).to_be_hidden()
    await expect(p.locator("#conn-state")).to_have_text("disconnected")
    await expect(p.locator("#token-error")).to_have_text("")
    # an expired token in the address: refused, with the node's reason
    old = await new_page(browser, f"{base}?token={token('old', ttl=-60)}")
    await expect(old.locator("#token-error")).to_contain_text("token expired", timeout=WAIT)
    assert old.url == base
    # a good token, pasted: logged in as its subject; the token leaves the address bar, and
    # is in no URL the page asks for (the WebSocket gets it as a subprotocol: URLs get logged)
    ann, ben, cat = f"ann{unique}", f"ben{unique}", f"cat{unique}"
    await p.fill("#token", token(ann))
    await p.press("#token", "Enter")
    await logged_in(p, ann)
    assert p.url == base
    await expect(p.locator("#logout-btn")).to_have_text("log out")
    assert any(u.endswith("/ws") for u in p.requests), p.requests
    assert not [u for u in p.requests if "token" in u or "eyJ" in u], p.requests
    b = await new_page(browser, f"{base}?token={token(ben)}")  # ?token= in the address: still
    await logged_in(b, ben)
    assert not [u for u in b.requests[1:] if "token" in u], b.requests  # only the page's own
    c = await new_page(browser, f"{base}#token={token(cat)}")  # a fragment: never sent at all
    await logged_in(c, cat)
    assert c.url == base
    assert not [u for u in c.requests if "token" in u or "eyJ" in u], c.requests
    await online_item(b, ann).click()
    await send(b, "hello with a token")
    await open_conv(p, f"dm:{ben}")
    await expect(messages(p).last).to_contain_text("hello with a token", timeout=WAIT)
    # a reload keeps the token (sessionStorage) and the rooms
    await join(p, f"jwt{unique}")
    await p.reload()
    await logged_in(p, ann)
    await expect(conv_item(p, f"room:jwt{unique}")).to_have_count(1, timeout=WAIT)
    # a token that expires: the node closes the connection (1008), the page asks for a new one
    short = await new_page(browser, f"{base}?token={token(f'short{unique}', ttl=3)}")
    await logged_in(short, f"short{unique}")
    await expect(short.locator("#token-error")).to_contain_text("token expired", timeout=WAIT)
    await expect(short.locator("#token-form")).to_be_visible()
    # log out: the token is forgotten
    await p.click("#logout-btn")
    await expect(p.locator("#token-form")).to_be_visible(timeout=WAIT)
    assert await p.evaluate("sessionStorage.length") == 0
    assert p.errors == b.errors == c.errors == old.errors == short.errors == []


async def test_narrow_screen_and_keyboard(cluster: Any, browser: Any, unique: str) -> None:
    me, peer = f"narrow{unique}", f"peer{unique}"
    page = await new_page(browser, cluster.nodes[0].http_url + "/", width=360)
    await expect(page.locator("#conn-state")).to_have_text("connected", timeout=WAIT)
    await page.locator("#name").press_sequentially(me)
    await page.keyboard.press("Enter")
    await logged_in(page, me)
    other = await open_page(browser, cluster.nodes[1].http_url + "/", peer)
    # every list entry is a button: reached and opened with the keyboard
    await online_item(page, peer).locator("button").focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#convs li.active")).to_have_attribute("data-conv", f"dm:{peer}")
    await page.locator("#text").focus()
    await page.keyboard.type("typed, then Enter")
    await page.keyboard.press("Enter")
    await open_conv(other, f"dm:{me}")
    await expect(messages(other).last).to_contain_text("typed, then Enter", timeout=WAIT)
    await conv_item(page, "room:lobby").locator("button").focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#convs li.active")).to_have_attribute("data-conv", "room:lobby")
    # usable at 360 px: nothing sideways, the message box on screen
    await no_horizontal_overflow(page)
    box = await page.locator("#compose").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 360 and box["y"] + box["height"] <= 700
    await page.screenshot(path=str(artifacts_dir() / "narrow-360.png"))
    assert page.errors == other.errors == []
