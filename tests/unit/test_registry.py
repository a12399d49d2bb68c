from wscluster.registry import Registry
from wscluster.routing import parse_address


def receivers(reg: Registry[str], to: str) -> set[str]:
    return {cid for cid, _ in reg.receivers(parse_address(to))}


def test_bind_join_and_interest() -> None:
    reg: Registry[str] = Registry()
    reg.add("n.1", "c1")
    reg.add("n.2", "c2")
    assert reg.bind("n.1", "alice").subscribe == ["uid:alice"]
    assert not reg.bind("n.2", "alice")  # second device: already subscribed
    assert reg.join("n.1", "g").subscribe == ["group:g"]
    assert not reg.join("n.2", "g")
    assert not reg.join("n.2", "g")  # idempotent
    assert receivers(reg, "uid:alice") == {"n.1", "n.2"}
    assert receivers(reg, "group:g") == {"n.1", "n.2"}
    assert receivers(reg, "all") == {"n.1", "n.2"}
    assert receivers(reg, "client:n.2") == {"n.2"}
    assert receivers(reg, "client:n.9") == set()
    assert sorted(reg.interests()) == ["group:g", "uid:alice"]


def test_last_member_leaving_drops_interest() -> None:
    reg: Registry[str] = Registry()
    reg.add("n.1", "c1")
    reg.add("n.2", "c2")
    reg.bind("n.1", "alice")
    reg.bind("n.2", "alice")
    reg.join("n.1", "g")
    assert not reg.leave("n.2", "g")  # not a member: nothing
    assert reg.leave("n.1", "g").unsubscribe == ["group:g"]
    assert not reg.leave("n.1", "g")
    entry, interest = reg.remove("n.1")
    assert entry is not None and entry.uid == "alice"
    assert not interest  # n.2 still holds alice
    _, interest = reg.remove("n.2")
    assert interest.unsubscribe == ["uid:alice"]
    assert len(reg) == 0 and reg.interests() == []
    assert reg.remove("n.2") == (None, reg.remove("n.2")[1])


def test_rebind_moves_the_connection() -> None:
    reg: Registry[str] = Registry()
    reg.add("n.1", "c1")
    reg.bind("n.1", "alice")
    reg.join("n.1", "g")
    change = reg.bind("n.1", "bob")
    assert change.subscribe == ["uid:bob"] and change.unsubscribe == ["uid:alice"]
    assert receivers(reg, "uid:alice") == set()
    assert receivers(reg, "uid:bob") == {"n.1"}
    assert reg.bind("n.1", None).unsubscribe == ["uid:bob"]
    entry, interest = reg.remove("n.1")
    assert interest.unsubscribe == ["group:g"]
    assert entry is not None and entry.groups == {"g"} and entry.uid is None


def test_version_counts_changes_only() -> None:
    reg: Registry[str] = Registry()
    reg.add("n.1", "c1")
    entry = reg.get("n.1")
    assert entry is not None and entry.version == 0
    reg.bind("n.1", "a")
    reg.bind("n.1", "a")  # no change
    reg.join("n.1", "g")
    reg.join("n.1", "g")  # no change
    reg.leave("n.1", "x")  # not a member: no change
    assert entry.version == 2
    reg.leave("n.1", "g")
    reg.bind("n.1", None)
    assert entry.version == 4
