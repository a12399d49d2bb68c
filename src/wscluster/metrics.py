"""Prometheus metrics of one node (a registry per node, so several nodes can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    def __init__(self, node_id: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"node": node_id}
        r = self.registry
        self.connections = Gauge(
            "wscluster_connections", "Open client connections", registry=r
        )
        self.connects = Counter("wscluster_connects", "Accepted WebSocket handshakes", registry=r)
        self.refused = Counter(
            "wscluster_handshakes_refused", "Refused handshakes by HTTP status",
            ["status"], registry=r,
        )  # fmt: skip
        self.frames_in = Counter("wscluster_frames_in", "Client frames received", registry=r)
        self.frames_out = Counter("wscluster_frames_out", "Frames written to clients", registry=r)
        self.published = Counter("wscluster_published", "Messages handed to the broker", registry=r)
        self.broker_in = Counter(
            "wscluster_broker_messages_in", "Envelopes received from the broker", registry=r
        )
        self.deliveries = Counter(
            "wscluster_deliveries", "Messages written to local receivers", registry=r
        )
        self.errors = Counter(
            "wscluster_errors", "Error frames sent to clients by code", ["code"], registry=r
        )
        self.closes = Counter(
            "wscluster_server_closes", "Connections closed by the server by close code",
            ["code"], registry=r,
        )  # fmt: skip
        self.outbox_dropped = Counter(
            "wscluster_outbox_dropped",
            "Queued messages of drop-oldest streams dropped from slow consumers' outboxes",
            registry=r,
        )
        self.broker_up = Gauge("wscluster_broker_connected", "1 while the broker link is up",
                               registry=r)  # fmt: skip
        self.presence_up = Gauge(
            "wscluster_presence_ok", "1 while the presence store answers", registry=r
        )
        self.purged = Counter(
            "wscluster_dead_nodes_purged", "Dead nodes purged by this node", registry=r
        )
        self.bad_envelopes = Counter(
            "wscluster_bad_envelopes", "Broker messages that could not be decoded", registry=r
        )
        self.app_errors = Counter(
            "wscluster_app_errors", "Application handler failures by hook", ["hook"], registry=r
        )
        self.gaps = Counter(
            "wscluster_history_gaps", "Gaps announced to receivers (lost, epoch_changed)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.repaired = Counter(
            "wscluster_history_repaired", "Messages missed on the broker link and read from "
            "the history instead", registry=r,
        )  # fmt: skip
        self.replayed = Counter(
            "wscluster_history_replayed", "Messages replayed to resuming clients", registry=r
        )
        self.probe_failures = Counter(
            "wscluster_broker_probe_failures",
            "Liveness probes that did not come back (the subscriber was restarted)", registry=r,
        )  # fmt: skip
        self.info = Gauge("wscluster_node_info", "Node identity", list(labels), registry=r)
        self.info.labels(**labels).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
