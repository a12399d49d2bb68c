"""Limits per client address: connections open at once and handshakes per second. No I/O.

The address is the TCP peer's, unless that peer is one of ``--trusted-proxies`` (nginx in
front): then it is the rightmost ``X-Forwarded-For`` entry that is not a trusted proxy
(entries further left were written by the client itself and prove nothing). Both limits
are off by default (0).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .buckets import Bucket

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_TRACKED = 100_000  # addresses whose handshake rate is remembered (then the idlest go)
REFUSED = "too many connections from your address"


def parse_networks(text: str | None) -> tuple[Network, ...]:
    """``--trusted-proxies 10.0.0.0/8,127.0.0.1`` -> networks; ValueError naming the bad one."""
    out: list[Network] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"--trusted-proxies: {part!r} is not an address or CIDR") from None
    return tuple(out)


def _trusted(address: str, networks: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(peer: str, forwarded: str | None, trusted: tuple[Network, ...]) -> str:
    """The address the limits count: ``peer`` (the TCP peer), or the client a trusted proxy
    names in ``X-Forwarded-For``."""
    if not forwarded or not trusted or not _trusted(peer, trusted):
        return peer
    for entry in reversed(forwarded.split(",")):
        entry = entry.strip()
        if entry and not _trusted(entry, trusted):
            return entry[:64]
    return peer


class PeerLimits:
    """``--max-connections-per-ip`` and ``--handshake-rate-per-ip`` (a burst of as many
    handshakes as one second allows), counted per client address (``client_address``)."""

    __slots__ = ("_open", "_rates", "max_connections", "rate", "trusted")

    def __init__(self, max_connections: int, rate: float, trusted: str | None = None) -> None:
        self.max_connections = max_connections
        self.rate = rate
        self.trusted = parse_networks(trusted)
        self._open: dict[str, int] = {}  # address -> connections open now
        self._rates: dict[str, Bucket] = {}  # address -> its handshakes (insertion: age)

    @property
    def enabled(self) -> bool:
        return self.max_connections > 0 or self.rate > 0

    def admit_peer(self, peer: str, forwarded: str | None, now: float) -> str | None:
        """Count a new connection from TCP peer ``peer`` (its proxy's ``X-Forwarded-For``:
        ``forwarded``): the address counted (give it to ``release`` at its close), or None
        when it is over a limit."""
        address = client_address(peer, forwarded, self.trusted)
        return address if self.admit(address, now) else None

    def admit(self, address: str, now: float) -> bool:
        """Count a new connection from ``address``; False (and nothing counted) when it is
        over a limit."""
        if self.rate > 0:
            bucket = self._rates.get(address)
            if bucket is None:
                if len(self._rates) >= MAX_TRACKED:
                    self._forget(now)
                bucket = self._rates[address] = Bucket(self.rate, max(1.0, self.rate), now)
            if not bucket.take(now):
                return False
        if self.max_connections > 0:
            n = self._open.get(address, 0)
            if n >= self.max_connections:
                return False
            self._open[address] = n + 1
        return True

    def release(self, address: str) -> None:
        """A connection ``admit`` counted has closed."""
        if self.max_connections <= 0:
            return
        n = self._open.get(address, 0) - 1
        if n > 0:
            self._open[address] = n
        else:
            self._open.pop(address, None)

    def _forget(self, now: float) -> None:
        """Drop the addresses whose bucket is full again (they are as if never seen); if
        that frees too little, the oldest half."""
        full = [a for a, b in self._rates.items() if b.full(now)]
        for address in full:
            del self._rates[address]
        if len(self._rates) >= MAX_TRACKED // 2:
            for address in list(self._rates)[: len(self._rates) // 2]:
                del self._rates[address]
