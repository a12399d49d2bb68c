"""README's "Using it", pasted against a live `wscluster up`: every shell and Python block runs
(marked `<!-- test: ... -->` on the line before it), so the README cannot rot.

Markers: `setup` (what a new shell pastes: activate the venv, the export line `up` printed),
`session` (an interactive `python -m websockets` session: its `>` frames are sent, its `<`
frames compared), `run` (a shell or Python block: must succeed) and `output` (what the `run`
block before it prints: its lines in order, positions and ids aside)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .test_up import _banner, _reap

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = re.compile(r"^<!-- test: (\w+) -->$")
VARYING = frozenset({"client_id", "node", "epoch", "ts", "offset"})


def blocks(section: str = "Using it") -> list[tuple[str | None, str, str]]:
    """(marker, info string, body) of every fenced block of a README section."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    lines = text[start:end if end >= 0 else None].splitlines()
    found: list[tuple[str | None, str, str]] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            info = lines[i][3:].strip()
            marker = MARKER.match(lines[i - 1]) if i else None
            j = lines.index("```", i + 1)
            found.append((marker.group(1) if marker else None, info, "\n".join(lines[i + 1:j])))
            i = j
        i += 1
    return found


def _ports(text: str, base: int, after: str = ":") -> str:
    """The README's ports (nodes on 8001..., APIs on 9001...) mapped to the test's cluster."""
    return re.sub(rf"(?<={after})([89])00(\d)\b",
                  lambda m: str(base + int(m.group(2)) + (1000 if m.group(1) == "9" else 0)),
                  text)  # fmt: skip


def _normal(line: str) -> str:
    """A line of output without what varies from run to run (ids, epochs, offsets)."""
    line = re.sub(r"\b[0-9a-f]{8,}\b", "ID", line)
    line = re.sub(r'(offset"?:?\s*)\d+', r"\1N", line)
    return " ".join(line.split())


def _same(expected: Any, got: Any, where: str = "") -> None:
    """A frame as the README shows it: the same fields, the same values but for ids,
    positions and times (there the same type, and empty or not alike)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected), (where, expected, got)
        for key, value in expected.items():
            if key in VARYING and not isinstance(value, dict):
                assert type(got[key]) is type(value), (where, key, got)
                assert bool(got[key]) == bool(value), (where, key, got)
            else:
                _same(value, got[key], f"{where}.{key}")
    else:
        assert got == expected, (where, expected, got)


async def _session(body: str, base: int) -> None:
    """Drive an interactive `python -m websockets URL` session shown with `>` and `<`."""
    import websockets

    command, *frames = body.splitlines()
    url = _ports(command, base).split()[-1]
    assert command.startswith("$ python -m websockets ws://"), command
    async with websockets.connect(url) as ws:
        pending: list[Any] = []  # frames shown in a row may arrive in any order
        for line in [*frames, "> "]:
            if line.startswith("< "):
                pending.append(json.loads(line[2:]))
                continue
            got = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in pending]
            for expected in pending:
                like = [g for g in got if g.get("type") == expected["type"]
                        and g.get("id") == expected.get("id")]  # fmt: skip
                assert like, (expected, got)
                _same(expected, like[0], expected["type"])
                got.remove(like[0])
            pending = []
            if line.strip() != ">":
                assert line.startswith("> "), line
                await ws.send(line[2:])


def _check_output(expected: str, printed: str) -> None:
    """Each line of `expected` is printed, in order."""
    got = [_normal(line) for line in printed.splitlines()]
    at = 0
    for line in expected.splitlines():
        want = _normal(line)
        assert want in got[at:], f"{line!r} is not in the output:\n{printed}"
        at = got.index(want, at) + 1


def test_every_block_is_run() -> None:
    """No shell or Python block of "Using it" escapes the test (JavaScript runs in a page)."""
    found = blocks()
    for marker, info, body in found:
        if info in ("sh", "python"):
            assert marker in ("setup", "session", "run"), body
        elif marker == "output":
            continue
        else:
            assert info == "js", (info, body)
    assert [m for m, _, _ in found].count("run") >= 3


async def test_readme_using_it_against_a_live_up(tmp_path: Path) -> None:
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").exists():
        pytest.skip("the tests do not run in a virtual environment (no bin/activate)")
    base = random.randrange(20000, 31000, 10)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSCLUSTER_")}
    # `up` ignores what it prints (a second `up` in that shell starts its own broker)
    nowhere = "redis://127.0.0.1:1/0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wscluster", "up", "--base-port", str(base)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**env, "WSCLUSTER_BROKER": nowhere, "WSCLUSTER_PRESENCE": nowhere},
    )  # fmt: skip
    try:
        banner = await _banner(proc)
        printed = re.findall(r"^ +(export WSCLUSTER_\w+=\S+)$", banner, re.M)
        assert len(printed) == 1 and "history" not in banner.split("Try it:")[1], banner
        assert re.search(r"wscluster send --to uid:alice ", banner), banner
        # a new shell, as the README says: the clone's .venv activated, up's line pasted
        (tmp_path / ".venv").symlink_to(venv)
        found = blocks()
        setup = [body for marker, _, body in found if marker == "setup"]
        assert len(setup) == 1
        readme_export = re.findall(r"^export WSCLUSTER_BROKER=\S+", setup[0], re.M)
        assert len(readme_export) == 1
        assert re.fullmatch(r"export WSCLUSTER_BROKER=redis://127\.0\.0\.1:\d+/0",
                            readme_export[0]) and re.fullmatch(  # the same shape as up's
            r"export WSCLUSTER_BROKER=redis://127\.0\.0\.1:\d+/0", printed[0])  # fmt: skip
        prelude = setup[0].replace(readme_export[0], printed[0])
        last = ""
        ran = 0
        for marker, info, body in found:
            if marker == "session":
                await _session(body, base)
            elif marker == "run":
                body = _ports(body, base)
                if info == "sh":
                    argv = ["bash", "-c", f"set -e\n{prelude}\n{body}"]
                else:
                    script = tmp_path / f"block{ran}.py"
                    script.write_text(body)
                    argv = ["bash", "-c", f"set -e\n{prelude}\npython {script}"]
                done = await asyncio.to_thread(
                    subprocess.run, argv, cwd=tmp_path, env=env, capture_output=True,
                    text=True, timeout=30,
                )  # fmt: skip
                assert done.returncode == 0, (body, done.stdout, done.stderr)
                last, ran = done.stdout, ran + 1
            elif marker == "output":
                _check_output(_ports(body, base, r"\s"), last)
        assert ran >= 3
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            await asyncio.to_thread(proc.wait, 30)
        _reap(proc)
