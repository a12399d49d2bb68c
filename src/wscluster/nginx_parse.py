"""The arguments of ``wscluster nginx-conf``: upstream addresses (``HOST:PORT``) and
``--listen`` values, checked and written as nginx reads them. Re-exported by
:mod:`wscluster.nginx`."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?$")  # a host name


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{what}: port must be 1-65535, not {text!r}")
    return int(text)


def _host(host: str) -> str:
    """A host name, an IPv4 address or a bracketed IPv6 address, as nginx writes it; ValueError
    otherwise (an unbracketed IPv6 address cannot be told from its port)."""
    if host.startswith("[") and host.endswith("]"):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"bad IPv6 address {host!r}") from None
        if address.scope_id:  # nginx has no `%zone` syntax
            raise ValueError(f"bad IPv6 address {host!r}: nginx takes no %zone")
        return f"[{address.compressed}]"
    if ":" in host:
        raise ValueError(f"bad host {host!r} (write an IPv6 address in brackets: [::1]:8001)")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"bad IPv4 address {host!r}") from None
    if not _NAME.match(host):
        raise ValueError(f"bad host {host!r}")
    return host


def parse_upstream(text: str) -> Upstream:
    """``HOST:PORT`` (``[::1]:8001`` for IPv6) -> Upstream; ValueError when malformed."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"upstream {text!r}: expected HOST:PORT")
    try:
        host = _host(host)
    except ValueError as exc:
        raise ValueError(f"upstream {text!r}: {exc}") from None
    return Upstream(host, _port(port, f"upstream {text!r}"))


def parse_upstreams(text: str) -> list[Upstream]:
    """Comma-separated ``HOST:PORT`` list (how WSCLUSTER_UPSTREAM carries several)."""
    return [parse_upstream(part) for part in text.split(",")]


def parse_listen(text: str) -> str:
    """``PORT`` or ``ADDRESS:PORT`` -> the argument of nginx's ``listen``."""
    text = text.strip()
    if text.isdigit():
        return str(_port(text, f"listen {text!r}"))
    try:
        return str(parse_upstream(text))
    except ValueError as exc:
        raise ValueError(str(exc).replace("upstream", "listen", 1)) from None


def parse_listens(text: str) -> list[str]:
    """Comma-separated ``--listen`` values (how WSCLUSTER_LISTEN carries several)."""
    return [parse_listen(part) for part in text.split(",")]
