"""The asyncio Python client (see ``core.Client``)."""

from .core import Client, connect
from .protocol import ConnectionClosed, HandshakeRefused, ServerError

__all__ = ["Client", "ConnectionClosed", "HandshakeRefused", "ServerError", "connect"]
