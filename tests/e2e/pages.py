"""Driving the chat page in Chromium: the steps a person takes, as helpers for the e2e tests."""

from __future__ import annotations

from typing import Any

import pytest

pw = pytest.importorskip("playwright.async_api")
expect = pw.expect

WAIT = 15_000  # ms: the longest any step may take (a dead node's presence is purged in ~10 s)


async def new_page(browser: Any, url: str, width: int = 1000) -> Any:
    """A page in its own browser context (its own sessionStorage: another tab or device);
    `page.errors` collects uncaught exceptions and CSP violations, `page.frames_in` the
    WebSocket frames received, `page.requests` the URLs it asked for (WebSockets included)."""
    context = await browser.new_context(viewport={"width": width, "height": 700})
    page = await context.new_page()
    errors: list[str] = []
    frames: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # the page must run under the nodes' Content-Security-Policy without a single violation
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text
            else None)  # fmt: skip
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(payload)))
    requests: list[str] = []  # the URL of every request and WebSocket the page made
    page.on("request", lambda r: requests.append(r.url))
    page.on("websocket", lambda ws: requests.append(ws.url))
    page.errors = errors
    page.frames_in = frames
    page.requests = requests
    await page.goto(url)
    return page


async def open_page(browser: Any, url: str, name: str, width: int = 1000) -> Any:
    """Open the page and log in with `name` through the form."""
    page = await new_page(browser, url, width)
    await expect(page.locator("#conn-state")).to_have_text("connected", timeout=WAIT)
    await page.fill("#name", name)
    await page.click("#login-btn")
    await logged_in(page, name)
    return page


async def logged_in(page: Any, name: str) -> None:
    await expect(page.locator("#me")).to_have_text(name, timeout=WAIT)
    await expect(page.locator("#login-view")).to_be_hidden()
    await expect(page.locator("#conn-state")).to_have_text("connected", timeout=WAIT)


async def send(page: Any, text: str) -> None:
    """Type a message and press Enter (the keyboard way to send)."""
    await page.fill("#text", text)
    await page.press("#text", "Enter")


async def join(page: Any, room: str) -> None:
    await page.fill("#room-name", room)
    await page.press("#room-name", "Enter")
    await expect(page.locator("#convs li.active")).to_have_attribute("data-conv", f"room:{room}")


def conv_item(page: Any, key: str) -> Any:
    return page.locator(f"#convs li[data-conv={_css(key)}]")


def online_item(page: Any, uid: str) -> Any:
    return page.locator(f"#online li[data-uid={_css(uid)}]")


def _css(text: str) -> str:
    """A CSS string for any text (names may hold quotes, backslashes, any character)."""
    escaped = "".join(f"\\{ord(c):x} " if c in '"\\' or ord(c) < 32 else c for c in text)
    return f'"{escaped}"'


async def open_conv(page: Any, key: str) -> None:
    item = conv_item(page, key)
    await expect(item).to_be_visible(timeout=WAIT)
    await item.click()
    await expect(page.locator("#convs li.active")).to_have_attribute("data-conv", key)


def messages(page: Any) -> Any:
    return page.locator("#messages .msg")
