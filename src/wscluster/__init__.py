"""wscluster: N WebSocket gateway nodes that act as one server, over Redis."""

from .app import App, AppError, Closed, Reject, Request
from .cluster import Cluster
from .conn import Conn
from .errors import BrokerUnavailable, Code, PresenceUnavailable, ProtocolError
from .policy import Action
from .sync_cluster import SyncCluster

__all__ = [
    "Action",
    "App",
    "AppError",
    "BrokerUnavailable",
    "Closed",
    "Cluster",
    "Code",
    "Conn",
    "PresenceUnavailable",
    "ProtocolError",
    "Reject",
    "Request",
    "SyncCluster",
]
__version__ = "0.1.0"
