"""Prometheus metrics of the worker and the Graph client, and the endpoint serving them.

The metrics live on prometheus_client's default registry, the library's own
idiom; defining them does no I/O. They count what this process did since it
started: Prometheus sums them across workers and hosts. Labels take only a
few values (HTTP status codes, why a request waited), never job ids or
mailboxes, so the number of series stays bounded whatever the queue holds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from syncctl.errors import BadInput

log = logging.getLogger(__name__)

# Scraped from another host, so every interface, as every Prometheus exporter does.
METRICS_ADDRESS = "0.0.0.0"  # noqa: S104
MAX_PORT = 65535
# A claim is one indexed statement: milliseconds normally, seconds only when something is wrong.
CLAIM_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

CHUNKS_CLAIMED = Counter("syncctl_chunks_claimed_total", "Chunks claimed by this process.")
CHUNKS_COMPLETED = Counter("syncctl_chunks_completed_total", "Chunks read to their end.")
CHUNKS_FAILED = Counter(
    "syncctl_chunks_failed_total",
    "Chunks that ended failed: a permanent error, or an error on their last attempt.",
)
CHUNKS_RETRIED = Counter(
    "syncctl_chunks_retried_total",
    "Attempts that failed and put their chunk back to pending for another try.",
)
CHUNKS_REAPED = Counter(
    "syncctl_chunks_reaped_total",
    "Chunks whose lease had expired, taken back by this process's reaper.",
)
CHUNKS_RELEASED = Counter(
    "syncctl_chunks_released_total",
    "Chunks handed back to pending on shutdown, without using up an attempt.",
)
LEASE_LOSSES = Counter(
    "syncctl_lease_losses_total",
    "Chunks taken away from this process while it worked on them (reaped, cancelled, reset).",
)
MESSAGES_SYNCED = Counter(
    "syncctl_messages_synced_total", "Messages written to the emails table (upserts included)."
)
GRAPH_REQUESTS = Counter(
    "syncctl_graph_requests_total",
    'Requests sent to Microsoft Graph, by HTTP status code ("error": no answer).',
    ["status"],
)
GRAPH_THROTTLE_WAIT = Counter(
    "syncctl_graph_throttle_wait_seconds_total",
    "Seconds spent waiting before retrying a Graph request, by reason "
    '("retry_after": Graph said how long; "backoff": a server error or no answer).',
    ["reason"],
)
CLAIM_LATENCY = Histogram(
    "syncctl_claim_latency_seconds",
    "How long one claim took, whether it found a chunk or not.",
    buckets=CLAIM_LATENCY_BUCKETS,
)
CHUNKS_IN_PROGRESS = Gauge("syncctl_chunks_in_progress", "Chunks this process holds right now.")


def count_graph_request(status: int | None) -> None:
    """One Graph request answered with `status`, or with no answer at all (None)."""
    GRAPH_REQUESTS.labels(status="error" if status is None else str(status)).inc()


class MetricsServer:
    """The /metrics endpoint, answered from a daemon thread until close()."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    def __repr__(self) -> str:
        return f"MetricsServer(port={self.port})"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve_metrics(port: int, *, address: str = METRICS_ADDRESS) -> MetricsServer:
    """Serve the default registry at http://address:port/metrics (port 0: any free one).
    Raises BadInput when the port cannot be listened on (taken, not allowed)."""
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"a port is from 0 to {MAX_PORT}, not {port}")
    try:
        server, thread = start_http_server(port, addr=address)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise BadInput(
            f"Cannot serve metrics on {address}:{port} ({reason}); choose a free --metrics-port."
        ) from None
    served = MetricsServer(server, thread)
    log.info("serving Prometheus metrics at http://%s:%d/metrics", address, served.port)
    return served


@contextmanager
def metrics_served(port: int, *, address: str = METRICS_ADDRESS) -> Iterator[MetricsServer]:
    """Serve metrics for the duration of the block."""
    served = serve_metrics(port, address=address)
    try:
        yield served
    finally:
        served.close()
