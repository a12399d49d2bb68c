"""Node configuration: every option of ``wscluster serve`` with its default."""

from __future__ import annotations

import importlib.util
import ipaddress
import socket
from dataclasses import dataclass


@dataclass(slots=True)
class NodeConfig:
    host: str = "0.0.0.0"
    port: int = 8001
    api_host: str = "127.0.0.1"
    api_port: int | None = None  # default: port + 1000
    broker: str = "redis://127.0.0.1:6379/0"
    presence: str | None = None  # default: the broker URL
    namespace: str = "wsc"
    node_name: str | None = None  # default: <host name>:<port>
    node_id: str | None = None  # the exact node id (`up` sets it to recognize its nodes)
    anonymous: bool = False
    jwt_secret: str | None = None  # HS256
    jwt_public_key: str | None = None  # path to a PEM file: RS256 (RSA) or ES256 (EC P-256)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = 0.0  # seconds of clock skew tolerated on exp/nbf
    jwt_max_lifetime: float = 86400.0  # seconds from now to a token's exp, at most (0: any)
    allowed_origins: str | None = None  # comma-separated exact origins; None: no check
    allow_missing_origin: bool = False  # with --allowed-origins: accept a missing Origin
    app: str | None = None  # module:attribute of a wscluster.App
    api_key: str | None = None
    api_insecure: bool = False  # serve the API beyond loopback without a key (on purpose)
    max_connections: int = 10_000
    max_message_size: int = 64 * 1024
    max_frame_size: int = 256 * 1024  # single frames over it close 1009 (picows' read buffer
    # grows to the largest frame read and never shrinks: this bounds what a client can pin)
    fragment_timeout: float = 10.0  # seconds to finish a fragmented message (0: no limit)
    # bytes queued to one client before it is closed 1013: room for the bursts of five
    # senders within --send-burst-bytes while the client reads at a fair speed
    max_outbox: int = 8 * 1024 * 1024
    max_groups_per_connection: int = 1000
    max_connections_per_ip: int = 0  # open at once from one client address (0: no limit)
    handshake_rate_per_ip: float = 0.0  # handshakes per second from one address (0: none)
    trusted_proxies: str | None = None  # comma-separated CIDRs whose X-Forwarded-For counts
    max_connections_per_uid: int = 100  # cluster-wide; 0: no limit
    max_session_size: int = 16 * 1024  # bytes of session data per connection
    rate_limit: float = 100.0  # client frames per second per connection (0: no limit)...
    rate_burst: int = 200  # ...after a burst of this many
    max_inflight: int = 256  # requests awaiting I/O per connection before reading pauses
    max_publish_queue: int = 32 * 1024 * 1024  # bytes; above it sends get rate_limited
    send_rate_bytes: int = 512 * 1024  # bytes/s a connection may send in messages (0: off)...
    send_burst_bytes: int = 1024 * 1024  # ...after a burst of this many
    ping_rate: float = 10.0  # pings (WebSocket and app-level) per second (0: no limit)...
    ping_burst: int = 50  # ...after a burst of this many
    abuse_burst: int = 1000  # errors a connection may cause in a burst...
    abuse_rate: float = 100.0  # ...and per second after that, before it is closed 1008
    ping_interval: float = 25.0
    node_heartbeat: float = 2.0
    node_ttl: float = 10.0
    drain_timeout: float = 10.0
    drain_batch: int = 500  # connections closed with 1012 per drain step
    request_timeout: float = 5.0  # broker/presence waits behind an ack
    transport: str = "asyncio"  # or "aiofastnet"
    history: tuple[str, ...] = ()  # PATTERN=N/Ts rules (history.py)
    max_replay: int = 1000  # messages replayed per stream per resume
    check_interval: float = 5.0  # seconds: history position check and broker liveness probe
    outbox_policy: tuple[str, ...] = ()  # PATTERN=close|drop-oldest rules (outbox.py)
    broker_timeout: float = 10.0  # seconds serve waits for the broker at start, then exits 1
    wait_for_broker: bool = False  # wait for the broker at start for ever
    reuse_port: bool = False  # SO_REUSEPORT on the public port: set for --workers' workers

    @property
    def effective_api_port(self) -> int:
        return self.api_port if self.api_port is not None else self.port + 1000

    @property
    def default_name(self) -> str:
        """``--node-name``, else ``<host name>:<port>`` (not the listening address)."""
        return self.node_name or f"{socket.gethostname()}:{self.port}"

    @property
    def presence_url(self) -> str:
        return self.presence or self.broker

    @property
    def jwt(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key)

    @property
    def origins(self) -> list[str] | None:
        if self.allowed_origins is None:
            return None
        return [o.strip() for o in self.allowed_origins.split(",") if o.strip()]

    def validate(self) -> None:
        if self.jwt_secret and self.jwt_public_key:
            raise ValueError("pass one of --jwt-secret and --jwt-public-key, not both")
        if self.anonymous and self.jwt:
            raise ValueError("--anonymous and a JWT key exclude each other: choose one")
        if not self.anonymous and not self.jwt:
            raise ValueError(
                "refusing to start: pass --jwt-secret or --jwt-public-key to authenticate "
                "clients, or --anonymous to accept any client"
            )
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < 32:
            raise ValueError("--jwt-secret must be at least 32 bytes (as long as the HS256 hash)")
        if self.api_key is None and not self.api_insecure and not _loopback(self.api_host):
            raise ValueError(
                f"refusing to start: --api-host {self.api_host} is reachable from other "
                "machines and --api-key is not set, so anyone could send, close and bind "
                "through the API: pass --api-key KEY (or --api-insecure if that is intended)"
            )
        if not 0 <= self.jwt_max_lifetime < float("inf"):
            raise ValueError("--jwt-max-lifetime must be a number of seconds >= 0 (0: no cap)")
        if self.max_connections_per_ip < 0 or self.handshake_rate_per_ip < 0:
            raise ValueError("--max-connections-per-ip and --handshake-rate-per-ip must be "
                             ">= 0 (0: no limit)")  # fmt: skip
        from .peers import parse_networks

        parse_networks(self.trusted_proxies)  # raises ValueError naming the bad entry
        if self.allowed_origins is not None and not self.origins:
            raise ValueError("--allowed-origins needs at least one origin")
        for rate, burst in (("rate_limit", "rate_burst"), ("ping_rate", "ping_burst"),
                            ("send_rate_bytes", "send_burst_bytes")):  # fmt: skip
            if getattr(self, rate) < 0 or getattr(self, burst) < 1:
                raise ValueError(f"--{rate.replace('_', '-')} must be >= 0 and "
                                 f"--{burst.replace('_', '-')} >= 1")  # fmt: skip
        if self.fragment_timeout < 0:
            raise ValueError("--fragment-timeout must be >= 0 (0: no limit)")
        from .preflight import PRESENCE_SCHEMES, check_url

        check_url("--broker", self.broker)  # first: a typo there is not a presence problem
        if self.presence is not None:
            check_url("--presence", self.presence, PRESENCE_SCHEMES)
        scheme = self.presence_url.partition("://")[0].lower()
        if scheme not in PRESENCE_SCHEMES:
            raise ValueError(
                f"the presence store needs Redis: with --broker {scheme}://... "
                "also pass --presence redis://host:port/db"
            )
        if self.broker_timeout <= 0:
            raise ValueError("--broker-timeout must be a positive number of seconds")
        if self.node_ttl <= self.node_heartbeat:
            raise ValueError("--node-ttl must be larger than --node-heartbeat")
        if self.max_message_size > self.max_frame_size:
            raise ValueError("--max-message-size must not exceed --max-frame-size")
        if self.transport not in ("asyncio", "aiofastnet"):
            raise ValueError("--transport must be asyncio or aiofastnet")
        if self.transport == "aiofastnet" and importlib.util.find_spec("aiofastnet") is None:
            raise ValueError("--transport aiofastnet needs the package: pip install aiofastnet")
        if self.history:
            from .history import Rules

            rules = Rules(self.history)  # raises ValueError naming the bad rule ('none': ok)
            if rules and self.broker.partition("://")[0].lower() not in ("redis", "rediss", "unix"):
                raise ValueError("--history needs a Redis broker (the append and the publish "
                                 "are one script on Redis)")  # fmt: skip
        if self.outbox_policy:
            from .outbox import OutboxRules

            OutboxRules(self.outbox_policy)  # raises ValueError naming the bad rule
        if self.reuse_port and not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError("--workers above 1 needs SO_REUSEPORT (Linux or BSD), which this "
                             "platform lacks: run one node per port instead")  # fmt: skip
        if self.max_replay < 1 or self.check_interval <= 0:
            raise ValueError("--max-replay must be >= 1 and --check-interval positive")
        for name in ("max_connections", "max_message_size", "max_frame_size", "max_outbox",
                     "max_session_size", "max_publish_queue", "max_inflight",
                     "request_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")


def _loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (a name other than localhost
    counts as reachable: it may resolve to anything)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
