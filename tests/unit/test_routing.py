import pytest

from wscluster.errors import Code, ProtocolError
from wscluster.naming import Names, client_id, new_node_id, node_of_client
from wscluster.routing import Address, Kind, channel_for, parse_address


@pytest.mark.parametrize(
    ("to", "kind", "name"),
    [
        ("all", Kind.ALL, ""),
        ("uid:alice", Kind.UID, "alice"),
        ("uid:a:b:c", Kind.UID, "a:b:c"),
        ("group:room:1", Kind.GROUP, "room:1"),
        ("group:" + "x" * 128, Kind.GROUP, "x" * 128),
        ("uid:名前", Kind.UID, "名前"),
        ("client:node1-abcdef01.1f", Kind.CLIENT, "node1-abcdef01.1f"),
    ],
)
def test_valid_addresses(to: str, kind: Kind, name: str) -> None:
    address = parse_address(to)
    assert address == Address(kind, name)
    assert str(address) == to


@pytest.mark.parametrize(
    "to",
    [None, 5, "", "All", "ALL", "uid:", "group:", "user:x", "UID:x", "group:" + "x" * 129,
     "client:", "client:nodot", "client:.5", "client:node.", ["uid:a"], "allx"],
)
def test_malformed_addresses_are_bad_request(to: object) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_address(to)
    assert info.value.code is Code.BAD_REQUEST


def test_client_ids_embed_their_node() -> None:
    node = new_node_id("127.0.0.1:8001")
    assert "." not in node
    assert node != new_node_id("127.0.0.1:8001")  # a new incarnation each time
    cid = client_id(node)
    prefix, _, secret = cid.rpartition(".")
    assert prefix == node and len(secret) == 16 and int(secret, 16) >= 0  # 64 bits
    assert node_of_client(cid) == node
    ids = {client_id(node) for _ in range(10_000)}
    assert len(ids) == 10_000  # random, not a counter: no two alike...
    assert len({i[-16:-12] for i in ids}) > 1000  # ...and not sequential
    assert node_of_client("garbage") is None


def test_channels_are_namespaced_and_distinct() -> None:
    a, b = Names("one"), Names("two")
    node = new_node_id("n")
    cid = client_id(node)
    assert channel_for(a, parse_address("uid:x")) != channel_for(b, parse_address("uid:x"))
    assert channel_for(a, parse_address(f"client:{cid}")) == a.node_channel(node)
    assert channel_for(a, parse_address("all")) == a.all_channel()
    channels = {channel_for(a, parse_address(t)) for t in ("uid:x", "group:x", "all")}
    assert len(channels) == 3
    with pytest.raises(ValueError):
        Names("")
