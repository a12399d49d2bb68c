"""Checks before anything starts: the URLs given (one line naming the option and what is
wrong), the ports to bind (taken ones are named), and whether the broker answers."""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

log = logging.getLogger("wscluster.preflight")

BROKER_SCHEMES = ("redis", "rediss", "unix", "memory", "nats", "amqp", "amqps")
PRESENCE_SCHEMES = ("redis", "rediss", "unix", "memory")
_DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "nats": 4222, "tls": 4222, "amqp": 5672,
                  "amqps": 5671}  # fmt: skip


def check_url(option: str, url: str, schemes: Iterable[str] = BROKER_SCHEMES) -> None:
    """ValueError naming ``option`` and what is wrong with ``url``, if anything."""
    allowed, url = tuple(schemes), redact(url)
    listed = ", ".join(f"{s}://" for s in allowed)
    if "://" not in url:
        raise ValueError(f"{option} {url!r} is not a URL: it has no scheme "
                         f"(expected one of {listed}, e.g. redis://{url or 'host:6379'})")
    scheme = url.partition("://")[0].lower()
    if scheme not in allowed and not (scheme == "tls" and "nats" in allowed):
        raise ValueError(f"{option} {url!r}: unknown scheme {scheme!r} (expected one of {listed})")
    if scheme in ("nats", "tls") and "," in url:  # a NATS cluster: each server URL
        for one in url.split(","):
            check_url(option, one.strip(), allowed)
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise ValueError(f"{option} {url!r} is malformed: {exc}") from None
    if scheme == "unix" and not parts.path:
        raise ValueError(f"{option} {url!r} has no socket path (unix:///path/to/socket)")
    if scheme in _DEFAULT_PORTS and not parts.hostname:
        raise ValueError(f"{option} {url!r} has no host ({scheme}://host:port)")


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return url.rpartition("@")[2] if "@" in url else url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


def busy_port(addresses: Iterable[tuple[str, int]], reuse_port: bool = False) -> str | None:
    """Why the first of ``addresses`` that cannot be bound cannot be, else None. Binds as the
    servers do (SO_REUSEADDR) and releases at once."""
    for host, port in addresses:
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)  # fmt: skip
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        for family, kind, proto, _, addr in infos:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                try:
                    s.bind(addr)
                except OSError as exc:
                    ip = f"[{addr[0]}]" if family == socket.AF_INET6 else addr[0]
                    if exc.errno == errno.EADDRINUSE:
                        return f"{ip}:{port} is already in use"
                    return f"cannot listen on {ip}:{port}: {exc.strerror or exc}"
    return None


def _connect(url: str, timeout: float) -> None:
    """One attempt to reach the server of ``url`` (OSError when it does not answer); for a
    comma-separated list of NATS servers, any of them."""
    if "," in url:
        error: OSError = OSError("no server")
        for one in url.split(","):
            try:
                return _connect(one.strip(), timeout)
            except OSError as exc:
                error = exc
        raise error
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "unix":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(parts.path)
        return
    host = parts.hostname or "127.0.0.1"
    port = parts.port or _DEFAULT_PORTS.get(scheme, 6379)
    socket.create_connection((host, port), timeout=timeout).close()


def wait_reachable(
    url: str, timeout: float, forever: bool = False, fail_on_refused: bool = False
) -> str | None:
    """Wait until the server of ``url`` accepts a connection: None, else why not (after
    ``timeout`` seconds; never when ``forever``, which logs each retry). ``memory://`` is
    always there."""
    if url.partition("://")[0].lower() == "memory":
        return None
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        left = deadline - time.monotonic()
        try:
            _connect(url, max(0.2, min(2.0, left)) if not forever else 2.0)
            return None
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            if fail_on_refused and isinstance(exc, (ConnectionRefusedError, FileNotFoundError)):
                return why
        if forever:
            log.warning("broker %s not reachable (%s); retrying in %.1f s", redact(url), why,
                        delay)  # fmt: skip
        elif time.monotonic() + delay > deadline:
            return why
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def check_urls(broker: str | None, presence: str | None) -> None:
    """ValueError naming ``--broker`` or ``--presence`` when its URL is malformed."""
    if broker is not None:
        check_url("--broker", broker)
    if presence is not None:
        check_url("--presence", presence, PRESENCE_SCHEMES)


def unreachable(
    broker: str | None, presence: str | None, timeout: float, **wait: bool
) -> tuple[str, str, str] | None:
    """The first of the broker and the presence store (once when they are the same server)
    that does not answer within ``timeout`` (``wait_reachable``'s options): (option, its URL
    without the password, why); None when both answer."""
    for option, url in (("--broker", broker), ("--presence", presence)):
        if url is None or (option == "--presence" and url == broker):
            continue
        why = wait_reachable(url, timeout, **wait)
        if why is not None:
            return option, redact(url), why
    return None
