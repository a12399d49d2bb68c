"""``SyncCluster``: a blocking ``Cluster`` for synchronous code (Django/Flask), running it on a
private event loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from .cluster import KICK, Cluster
from .history import Position

T = TypeVar("T")


class SyncCluster:
    """Blocking wrapper for synchronous code: runs a Cluster on a private event loop thread."""

    def __init__(self, broker_url: str = "redis://127.0.0.1:6379/0", **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="wscluster-sync")  # fmt: skip
        self._thread.start()
        self._cluster = self._run(self._make(broker_url, kwargs))

    @staticmethod
    async def _make(broker_url: str, kwargs: dict[str, Any]) -> Cluster:
        return Cluster(broker_url, **kwargs)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def send(self, to: str, data: Any, *, exclude: Iterable[str] = ()) -> Position | None:
        return self._run(self._cluster.send(to, data, exclude=exclude))

    def history(self, stream: str, limit: int = 50) -> list[dict[str, Any]]:
        return self._run(self._cluster.history(stream, limit))

    def close(self, to: str, code: int = KICK) -> None:
        self._run(self._cluster.close(to, code))

    def is_online(self, uid: str) -> bool:
        return self._run(self._cluster.is_online(uid))

    def client_ids(self, uid: str) -> list[str]:
        return self._run(self._cluster.client_ids(uid))

    def group_members(self, group: str) -> list[str]:
        return self._run(self._cluster.group_members(group))

    def group_count(self, group: str) -> int:
        return self._run(self._cluster.group_count(group))

    def count(self) -> int:
        return self._run(self._cluster.count())

    def bind_uid(self, client_id: str, uid: str) -> bool:
        return self._run(self._cluster.bind_uid(client_id, uid))

    def unbind_uid(self, client_id: str) -> bool:
        return self._run(self._cluster.unbind_uid(client_id))

    def join(self, client_id: str, group: str) -> bool:
        return self._run(self._cluster.join(client_id, group))

    def leave(self, client_id: str, group: str) -> bool:
        return self._run(self._cluster.leave(client_id, group))

    def get_session(self, client_id: str) -> dict[str, Any] | None:
        return self._run(self._cluster.get_session(client_id))

    def set_session(self, client_id: str, values: Mapping[str, Any]) -> bool:
        return self._run(self._cluster.set_session(client_id, values))

    def update_session(self, client_id: str, values: Mapping[str, Any]) -> bool:
        return self._run(self._cluster.update_session(client_id, values))

    def stats(self) -> dict[str, Any]:
        return self._run(self._cluster.stats())

    def shutdown(self) -> None:
        """Close connections and stop the private loop."""
        if self._loop.is_closed():
            return
        self._run(self._cluster.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> SyncCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
