"""wscluster: N WebSocket gateway nodes that act as one server, over Redis."""

from .cluster import Cluster, SyncCluster
from .errors import BrokerUnavailable, Code, PresenceUnavailable, ProtocolError

__all__ = [
    "BrokerUnavailable",
    "Cluster",
    "Code",
    "PresenceUnavailable",
    "ProtocolError",
    "SyncCluster",
]
__version__ = "0.1.0"
