"""Per-address limits (peers.py): pure unit tests."""

from __future__ import annotations

import pytest

from wscluster.peers import MAX_TRACKED, PeerLimits, client_address, parse_networks

PROXIES = parse_networks("10.0.0.0/8, 127.0.0.1,::1")


def test_the_peer_counts_unless_it_is_a_trusted_proxy() -> None:
    assert client_address("203.0.113.9", "1.2.3.4", PROXIES) == "203.0.113.9"
    assert client_address("10.1.2.3", None, PROXIES) == "10.1.2.3"
    assert client_address("10.1.2.3", "1.2.3.4", PROXIES) == "1.2.3.4"
    assert client_address("127.0.0.1", "1.2.3.4", ()) == "127.0.0.1"  # none trusted


def test_the_rightmost_untrusted_entry_is_the_client() -> None:
    # the client wrote "6.6.6.6" itself; nginx appended the address it saw
    assert client_address("10.0.0.5", "6.6.6.6, 198.51.100.7", PROXIES) == "198.51.100.7"
    # two proxies of ours in a row
    assert client_address("10.0.0.5", "198.51.100.7, 10.0.0.9", PROXIES) == "198.51.100.7"
    assert client_address("::1", "10.0.0.1, 10.0.0.2", PROXIES) == "::1"  # only proxies


def test_bad_networks_are_named() -> None:
    with pytest.raises(ValueError, match="'nope'"):
        parse_networks("10.0.0.0/8,nope")
    assert parse_networks(None) == ()


def test_connections_per_address() -> None:
    limits = PeerLimits(2, 0)
    assert limits.admit("a", 0) and limits.admit("a", 0)
    assert not limits.admit("a", 0)
    assert limits.admit("b", 0)
    limits.release("a")
    assert limits.admit("a", 0)
    for _ in range(5):
        limits.release("a")  # more releases than admits never go below zero
    assert limits.admit("a", 0) and limits.admit("a", 0) and not limits.admit("a", 0)


def test_handshake_rate_and_bounded_memory() -> None:
    limits = PeerLimits(0, 2)
    assert limits.admit("a", 0) and limits.admit("a", 0)
    assert not limits.admit("a", 0)
    assert limits.admit("a", 0.5)  # one more after half a second
    for i in range(MAX_TRACKED + 10):  # a flood from many addresses
        limits.admit(f"x{i}", 1.0)
    assert len(limits._rates) <= MAX_TRACKED
