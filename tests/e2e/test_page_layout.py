"""The chat page's layout, checked on screenshots in a narrow (phone) and a wide window: the
"change name" button on one line whatever the name, every placeholder whole, and a system
message's toast covering neither the conversation's header nor the message being typed."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.pages import WAIT, expect, join, open_page

pytestmark = pytest.mark.timeout(120)


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
            and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"])  # fmt: skip


def _post(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200


# the text of an input's placeholder is wider than its box (the box clips it)
PLACEHOLDER_CUT = """(el) => {
  const style = getComputedStyle(el);
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = style.font;
  const room = el.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  return ctx.measureText(el.placeholder).width > room;
}"""


@pytest.mark.parametrize("width", [360, 1000], ids=["narrow", "wide"])
async def test_layout_on_a_screenshot(
    cluster: Any, browser: Any, unique: str, tmp_path: Path, width: int
) -> None:
    node = cluster.nodes[0]
    name = f"Maximilian-Alexander{unique}"[:32]  # the longest names the page takes
    page = await open_page(browser, f"{node.http_url}/", name, width)
    await join(page, f"room{unique}")
    # "change name" is one line high, next to a name of any length
    button = page.locator("#logout-btn")
    box = await button.bounding_box()
    line = await button.evaluate("(el) => parseFloat(getComputedStyle(el).lineHeight)")
    assert box is not None and box["height"] < 1.5 * line, (box, line)
    # every placeholder of the chat view fits its input
    for selector in ("#room-name", "#dm-name", "#text"):
        assert not await page.locator(selector).evaluate(PLACEHOLDER_CUT), selector
    # a system message: its toast leaves the header and the compose bar visible
    await asyncio.to_thread(_post, f"{node.api_url}/api/send",
                            {"to": "all", "data": {"text": f"maintenance at 22:00 {unique}"}})
    toast = page.locator("#toast")
    await expect(toast).to_be_visible(timeout=WAIT)
    await page.screenshot(path=str(tmp_path / f"chat-{width}.png"))
    # a short one whole: not squeezed into a narrow column and clipped
    assert await toast.evaluate("(el) => el.scrollHeight <= el.clientHeight")
    toast_box = await toast.bounding_box()
    assert toast_box is not None
    for covered in ("header", ".pane-head", "#compose", "#logout-btn"):
        other = await page.locator(covered).bounding_box()
        assert other is not None and not _overlap(toast_box, other), (covered, toast_box, other)
