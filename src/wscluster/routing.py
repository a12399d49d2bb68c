"""Addresses (``to``): parsing, validation and the broker channel each one maps to. No I/O."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .errors import bad_request
from .naming import Names, node_of_client

MAX_NAME = 128
MAX_CLIENT_ID = 200


class Kind(StrEnum):
    CLIENT = "client"
    UID = "uid"
    GROUP = "group"
    ALL = "all"


@dataclass(frozen=True, slots=True)
class Address:
    kind: Kind
    name: str  # '' for ALL

    def __str__(self) -> str:
        return "all" if self.kind is Kind.ALL else f"{self.kind}:{self.name}"


def is_utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: it holds no lone surrogate (U+D800-U+DFFF),
    which a JSON escape such as ``"\\ud800"`` or Python code can put into a ``str`` but no
    broker or store takes (encoding it raises ``UnicodeEncodeError``)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_name(name: object, what: str) -> str:
    """A uid or group name: a string of 1-128 characters of UTF-8 (any character, control
    characters included, but no lone surrogate: see ``is_utf8``)."""
    if not isinstance(name, str):
        raise bad_request(f"{what} must be a string")
    if not 1 <= len(name) <= MAX_NAME:
        raise bad_request(f"{what} must be 1-{MAX_NAME} characters")
    if not is_utf8(name):
        raise bad_request(f"{what} must be valid UTF-8 (it holds a lone surrogate)")
    return name


def parse_address(to: object) -> Address:
    """Parse a ``to`` string; raise ``bad_request`` when it is malformed."""
    if not isinstance(to, str):
        raise bad_request("'to' must be a string")
    if to == "all":
        return Address(Kind.ALL, "")
    prefix, colon, name = to.partition(":")
    if not colon:
        raise bad_request("'to' must be client:<id>, uid:<uid>, group:<name> or all")
    if prefix == "uid":
        return Address(Kind.UID, check_name(name, "uid"))
    if prefix == "group":
        return Address(Kind.GROUP, check_name(name, "group name"))
    if prefix == "client":
        if not (1 <= len(name) <= MAX_CLIENT_ID and node_of_client(name) and is_utf8(name)):
            raise bad_request("malformed client id")
        return Address(Kind.CLIENT, name)
    raise bad_request(f"unknown address prefix {prefix[:32]!r}")


def channel_for(names: Names, address: Address) -> str:
    """The broker channel a message to ``address`` is published on."""
    if address.kind is Kind.CLIENT:
        node = node_of_client(address.name)
        assert node is not None  # checked by parse_address
        return names.node_channel(node)
    if address.kind is Kind.ALL:
        return names.all_channel()
    return names.channel(str(address))
