"""Every name wscluster puts on the wire or in the broker: node ids, client ids, channels, keys.

Keep all key and channel construction here, so that the namespace is applied in one place.
"""

from __future__ import annotations

import os
import re

_NODE_NAME_RE = re.compile(r"[^A-Za-z0-9_.:\-]")


def new_node_id(name: str) -> str:
    """A fresh node incarnation id: ``<name>-<8 hex>``; dots are not allowed in ``name``."""
    clean = _NODE_NAME_RE.sub("_", name).replace(".", "_")[:64] or "node"
    return f"{clean}-{os.urandom(4).hex()}"


def client_id(node_id: str) -> str:
    """A fresh client id: ``<node id>.<16 hex>``. The node part routes it without a lookup;
    the rest is 64 random bits from the OS, so nobody can guess another client's id (node
    ids are public in ``/nodes.json``, and a counter let a client enumerate strangers)."""
    return f"{node_id}.{os.urandom(8).hex()}"


def node_of_client(cid: str) -> str | None:
    """The node id embedded in a client id, or None when the id is not ours."""
    node, dot, counter = cid.rpartition(".")
    if not dot or not node or not counter:
        return None
    return node


class Names:
    """Channels and store keys of one cluster namespace."""

    __slots__ = ("ns",)

    def __init__(self, namespace: str) -> None:
        if not namespace or any(c.isspace() for c in namespace):
            raise ValueError("namespace must be a non-empty string without spaces")
        self.ns = namespace

    # --- broker channels -------------------------------------------------------------
    def channel(self, address: str) -> str:
        """The broker channel of a ``uid:``/``group:``/``all`` address string."""
        return f"{self.ns}:c:{address}"

    def node_channel(self, node_id: str) -> str:
        """A node's own channel: ``client:`` addresses and control messages for that node."""
        return f"{self.ns}:n:{node_id}"

    def all_channel(self) -> str:
        return f"{self.ns}:c:all"

    def reply_channel(self, token: str) -> str:
        """Where one API process hears the answers to its control requests."""
        return f"{self.ns}:r:{token}"

    # --- presence store keys ---------------------------------------------------------
    def nodes_key(self) -> str:
        """Sorted set of known node ids (member) -> first-seen time (score)."""
        return f"{self.ns}:nodes"

    def alive_key(self, node_id: str) -> str:
        """String with a TTL, refreshed by the node's heartbeat; holds its stats as JSON."""
        return f"{self.ns}:alive:{node_id}"

    def node_conns_key(self, node_id: str) -> str:
        """Hash client id -> uid ('' when none) of one node's connections."""
        return f"{self.ns}:nc:{node_id}"

    def conn_key(self, cid: str) -> str:
        """Hash of one connection: uid, a g:<group> field per group, s:<key> session fields."""
        return f"{self.ns}:conn:{cid}"

    def uid_key(self, uid: str) -> str:
        """Set of client ids bound to a uid."""
        return f"{self.ns}:uid:{uid}"

    def group_key(self, group: str) -> str:
        """Hash client id -> uid ('' when none) of a group's members."""
        return f"{self.ns}:grp:{group}"

    def purging_key(self) -> str:
        """Set of dead node ids whose purge began and has not finished."""
        return f"{self.ns}:purging"

    def purge_lease_key(self, node_id: str) -> str:
        """String with a TTL: the token of the survivor purging a dead node (its lease)."""
        return f"{self.ns}:purge:{node_id}"

    # --- history (broker.redis_history) ------------------------------------------------
    def history_key(self, stream: str) -> str:
        """Stream of a history-enabled address: entry id ``<offset>-0``, field ``f`` = frame."""
        return f"{self.ns}:h:{stream}"

    def history_meta_key(self, stream: str) -> str:
        """Hash of a history-enabled address: ``o`` last offset, ``e`` epoch."""
        return f"{self.ns}:hm:{stream}"

    def history_rules_key(self) -> str:
        """String, no TTL: the cluster's ``--history`` rules as a JSON list (presence)."""
        return f"{self.ns}:history-rules"
