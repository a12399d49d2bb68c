"""The node's local connection registry: who is connected here, bound to which uid, in which
groups. Pure data structure, no I/O.

Every mutation returns the interest changes it causes: the ``uid:X`` / ``group:G`` addresses
that got their first local member (subscribe) or lost their last one (unsubscribe). The node
turns them into broker (un)subscriptions, so a node only hears about addresses it serves.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .routing import Address, Kind

C = TypeVar("C")


@dataclass(slots=True)
class Interest:
    """Addresses (as strings) gaining their first / losing their last local member."""

    subscribe: list[str] = field(default_factory=list)
    unsubscribe: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.subscribe or self.unsubscribe)


_NO_GROUPS: frozenset[str] = frozenset()


@dataclass(slots=True)
class Entry(Generic[C]):
    conn: C
    uid: str | None = None
    groups: set[str] | frozenset[str] = _NO_GROUPS  # shared while empty (~200 B/connection)
    version: int = 0  # bumped by every change of uid or groups


class Registry(Generic[C]):
    """Local connections indexed by client id, uid and group."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry[C]] = {}
        self._by_uid: dict[str, dict[str, C]] = {}
        self._by_group: dict[str, dict[str, C]] = {}

    # --- queries ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, cid: object) -> bool:
        return cid in self._entries

    def get(self, cid: str) -> Entry[C] | None:
        return self._entries.get(cid)

    def items(self) -> Iterator[tuple[str, Entry[C]]]:
        return iter(list(self._entries.items()))

    def uids(self) -> Iterable[str]:
        return self._by_uid.keys()

    def groups(self) -> Iterable[str]:
        return self._by_group.keys()

    def uid_size(self, uid: str) -> int:
        return len(self._by_uid.get(uid, ()))

    def group_size(self, group: str) -> int:
        return len(self._by_group.get(group, ()))

    def receivers(self, address: Address) -> Iterable[tuple[str, C]]:
        """The local (client id, connection) pairs an address reaches."""
        if address.kind is Kind.ALL:
            return [(cid, e.conn) for cid, e in self._entries.items()]
        if address.kind is Kind.UID:
            return list(self._by_uid.get(address.name, {}).items())
        if address.kind is Kind.GROUP:
            return list(self._by_group.get(address.name, {}).items())
        entry = self._entries.get(address.name)
        return [(address.name, entry.conn)] if entry is not None else []

    def conns(self, address: Address) -> list[C]:
        """The local connections an address reaches (a copy: safe to change the registry
        while going through it)."""
        if address.kind is Kind.GROUP:
            return list(self._by_group.get(address.name, {}).values())
        if address.kind is Kind.UID:
            return list(self._by_uid.get(address.name, {}).values())
        return [conn for _, conn in self.receivers(address)]

    def interests(self) -> list[str]:
        """Every address this node must currently be subscribed to (after a reconnect)."""
        return [f"uid:{u}" for u in self._by_uid] + [f"group:{g}" for g in self._by_group]

    # --- mutations -------------------------------------------------------------------
    def add(self, cid: str, conn: C) -> None:
        if cid in self._entries:
            raise KeyError(f"duplicate client id {cid}")
        self._entries[cid] = Entry(conn)

    def remove(self, cid: str) -> tuple[Entry[C] | None, Interest]:
        """Forget a connection; returns its entry as it was (uid, groups) and the interest
        it drops."""
        entry = self._entries.get(cid)
        interest = Interest()
        if entry is None:
            return None, interest
        last = Entry(entry.conn, entry.uid, set(entry.groups))
        for group in list(entry.groups):
            self._leave(cid, entry, group, interest)
        self._unbind(cid, entry, interest)
        del self._entries[cid]
        return last, interest

    def bind(self, cid: str, uid: str | None) -> Interest:
        """Bind (or with None unbind) a uid; re-binding moves the connection."""
        entry = self._entries[cid]
        interest = Interest()
        if entry.uid == uid:
            return interest
        self._unbind(cid, entry, interest)
        entry.version += 1
        if uid is not None:
            members = self._by_uid.get(uid)
            if members is None:
                members = self._by_uid[uid] = {}
                interest.subscribe.append(f"uid:{uid}")
            members[cid] = entry.conn
            entry.uid = uid
        return interest

    def join(self, cid: str, group: str) -> Interest:
        entry = self._entries[cid]
        interest = Interest()
        if group in entry.groups:
            return interest
        members = self._by_group.get(group)
        if members is None:
            members = self._by_group[group] = {}
            interest.subscribe.append(f"group:{group}")
        members[cid] = entry.conn
        if isinstance(entry.groups, set):
            entry.groups.add(group)
        else:
            entry.groups = {group}
        entry.version += 1
        return interest

    def leave(self, cid: str, group: str) -> Interest:
        entry = self._entries[cid]
        interest = Interest()
        if group in entry.groups:
            self._leave(cid, entry, group, interest)
            entry.version += 1
        return interest

    # --- helpers ---------------------------------------------------------------------
    def _unbind(self, cid: str, entry: Entry[C], interest: Interest) -> None:
        old = entry.uid
        if old is None:
            return
        members = self._by_uid[old]
        del members[cid]
        if not members:
            del self._by_uid[old]
            interest.unsubscribe.append(f"uid:{old}")
        entry.uid = None

    def _leave(self, cid: str, entry: Entry[C], group: str, interest: Interest) -> None:
        members = self._by_group[group]
        del members[cid]
        if not members:
            del self._by_group[group]
            interest.unsubscribe.append(f"group:{group}")
        if isinstance(entry.groups, set):
            entry.groups.discard(group)
