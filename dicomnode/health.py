"""Health and metrics over HTTP: ``/health`` (JSON) and ``/metrics`` (Prometheus text).

``/health`` answers 503 "receiver down" when the DICOM receiver does not listen, else 200
with status "ok" or "degraded" and the ``reasons`` (dead letters, failed jobs, refused
pipelines, low disk: :mod:`dicomnode.degraded`).

Metrics are read from the durable state at scrape time, so they survive restarts and
agree with what the node will do next: series, jobs and outbox items by state, stored
instances and delivery attempts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicomnode.startup import listen_error

Counts = Callable[[], dict[str, dict[str, int]]]
PipelineStatuses = Callable[[], list[dict[str, str | None]]]
Problems = Callable[[], list[str]]  # why the node is degraded (empty: it is not)


class StateCollector(Collector):
    """Prometheus collector over the node's state counts."""

    def __init__(self, counts: Counts) -> None:
        """Collect from ``counts`` (usually ``StateStore.counts_by_state``)."""
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        """One gauge family per table, labelled by state."""
        for table, by_state in self.counts().items():
            family = GaugeMetricFamily(
                f"dicomnode_{table}",
                f"dicomnode {table.replace('_', ' ')} by state",
                labels=["state"],
            )
            for state, count in sorted(by_state.items()):
                family.add_metric([state], count)
            yield family


class HealthServer:
    """A small HTTP server for load balancers and Prometheus; runs in a thread."""

    def __init__(
        self,
        host: str,
        port: int,
        counts: Counts,
        is_alive: Callable[[], bool],
        pipelines: PipelineStatuses | None = None,
        problems: Problems | None = None,
        collectors: Sequence[Collector] = (),
    ) -> None:
        """Serve on ``host:port``; ``is_alive`` says whether the DICOM receiver listens;
        ``pipelines`` (optional) lists the pipelines in service with their status;
        ``problems`` (optional) says why the node is degraded; ``collectors`` add
        metrics (e.g. retention's deletion counters)."""
        registry = CollectorRegistry()
        registry.register(StateCollector(counts))
        for collector in collectors:
            registry.register(collector)
        handler = _handler(registry, counts, is_alive, pipelines, problems)
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise listen_error("HTTP", host, port, exc) from None
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="dicomnode-http", daemon=True
        )

    @property
    def port(self) -> int:
        """The port actually bound (useful when 0 was asked)."""
        return int(self.server.server_address[1])

    def start(self) -> None:
        """Start serving."""
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _handler(
    registry: CollectorRegistry,
    counts: Counts,
    is_alive: Callable[[], bool],
    pipelines: PipelineStatuses | None = None,
    problems: Problems | None = None,
) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to this node's registry and probes."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            """Answer /health and /metrics; 404 otherwise."""
            if self.path == "/metrics":
                self._reply(200, "text/plain; version=0.0.4", generate_latest(registry))
            elif self.path == "/health":
                alive = is_alive()
                reasons = problems() if problems is not None else []
                status = "degraded" if reasons else "ok"
                body: dict[str, object] = {
                    "status": status if alive else "receiver down",
                    "reasons": reasons,
                    "state": counts(),
                }
                if pipelines is not None:
                    body["pipelines"] = pipelines()
                self._reply(200 if alive else 503, "application/json", json.dumps(body).encode())
            else:
                self._reply(404, "text/plain", b"not found\n")

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Requests are not logged (health probes would flood the log)."""

    return Handler
