"""A test application (tests/cluster/test_token_groups.py) whose ``authorize`` hook lets every
connection join the groups named ``granted:*``, whatever its token's ``groups`` claim says;
everything else keeps the default (the token's claims)."""

from __future__ import annotations

from wscluster import Action, App, Conn

app = App()


@app.authorize
def authorize(conn: Conn, action: Action, target: str) -> bool | None:
    if action is Action.JOIN and target.startswith("group:granted:"):
        return True
    return None
