"""Health, metrics and the status page over HTTP: ``/health`` (JSON), ``/metrics``
(Prometheus text), ``/`` (the status page, ``dicomnode.status_page``) and
``POST /deliveries/<id>/retry`` (the page's re-send button).

``/health`` answers 503 "receiver down" when the DICOM receiver does not listen, else 200
with status "ok" or "degraded" and the ``reasons`` (dead letters, failed jobs, refused
pipelines, low disk: :mod:`dicomnode.degraded`).

Metrics are read from the durable state at scrape time, so they survive restarts and
agree with what the node will do next: series, jobs and outbox items by state, stored
instances, delivery attempts and the turnaround histogram. When a token is configured,
the status page and its actions need it; ``/health`` and ``/metrics`` stay open to probes.
"""

from __future__ import annotations

import hmac
import json
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from dicomnode.overview import Overview, histogram_buckets
from dicomnode.startup import listen_error
from dicomnode.status_page import render_status_page

Counts = Callable[[], dict[str, dict[str, int]]]
PipelineStatuses = Callable[[], list[dict[str, str | None]]]
_RETRY = re.compile(r"/deliveries/(\d{1,18})/retry")
_MAX_FORM_BYTES = 4096
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


class TurnaroundCollector(Collector):
    """The turnaround histogram (last instance received to last result delivered)."""

    def __init__(self, turnarounds: Callable[[], tuple[float, ...]]) -> None:
        """Collect from ``turnarounds`` (every delivered job's turnaround, seconds)."""
        self.turnarounds = turnarounds

    def collect(self) -> Iterator[Metric]:
        """One histogram over every delivered job in the state."""
        values = self.turnarounds()
        yield HistogramMetricFamily(
            "dicomnode_turnaround_seconds",
            "Last instance received to last result acknowledged by the destination",
            buckets=histogram_buckets(values),
            sum_value=sum(values),
        )


class StageCollector(Collector):
    """Where jobs' time goes, per pipeline and stage (``pipelines.stages``, and
    ``sending``: job finished to last result delivered), as a summary."""

    def __init__(self, totals: Callable[[], list[tuple[str, str, int, float]]]) -> None:
        """Collect from ``totals`` (``JobQueue.stage_totals``)."""
        self.totals = totals

    def collect(self) -> Iterator[Metric]:
        """One summary: jobs and seconds in all per pipeline and stage."""
        family = SummaryMetricFamily(
            "dicomnode_job_stage_seconds",
            "Seconds jobs spent per stage (load, segmentation, features, model, writers, "
            "other; on Celery dispatch, broker, transfer, result; sending)",
            labels=["pipeline", "stage"],
        )
        for pipeline, stage, count, seconds in sorted(self.totals()):
            family.add_metric([pipeline, stage], count, seconds)
        yield family


@dataclass(frozen=True)
class StatusPage:
    """What the status page shows and does: the state ``overview``, ``retry`` of a dead
    letter by outbox id, the turnaround alarm threshold and the token it needs (if any)."""

    overview: Callable[[], Overview]
    retry: Callable[[int], bool]
    alarm_s: float
    token: str | None = None

    def allows(self, offered: str | None) -> bool:
        """Whether a request offering ``offered`` may see the page or act on it."""
        if self.token is None:
            return True
        return offered is not None and hmac.compare_digest(offered, self.token)


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
        status_page: StatusPage | None = None,
    ) -> None:
        """Serve on ``host:port``; ``is_alive`` says whether the DICOM receiver listens;
        ``pipelines`` (optional) lists the pipelines in service with their status;
        ``problems`` (optional) says why the node is degraded; ``collectors`` add
        metrics (e.g. retention's deletion counters); ``status_page`` (optional) serves
        ``/`` and the turnaround histogram."""
        registry = CollectorRegistry()
        registry.register(StateCollector(counts))
        for collector in collectors:
            registry.register(collector)
        if status_page is not None:
            overview = status_page.overview
            registry.register(TurnaroundCollector(lambda: overview().turnarounds_s))
        handler = _handler(registry, counts, is_alive, pipelines, problems, status_page)
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
    page: StatusPage | None = None,
) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to this node's registry and probes."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            """Answer /health, /metrics and the status page; 404 otherwise."""
            url = urlsplit(self.path)
            if page is not None and url.path == "/":
                self._status_page(page, parse_qs(url.query))
            elif self.path == "/metrics":
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

        def do_POST(self) -> None:
            """The status page's re-send button: put one dead letter back in the queue."""
            match = _RETRY.fullmatch(urlsplit(self.path).path)
            if page is None or match is None:
                self._reply(404, "text/plain", b"not found\n")
                return
            length = min(int(self.headers.get("Content-Length") or 0), _MAX_FORM_BYTES)
            form = parse_qs(self.rfile.read(length).decode("ascii", "replace"))
            token = self._offered_token(form)
            if not page.allows(token):
                self._reply(403, "text/plain", b"the status page token is missing or wrong\n")
                return
            outbox_id = int(match.group(1))
            done = page.retry(outbox_id)
            notice = (
                f"delivery {outbox_id} queued for re-sending"
                if done
                else f"delivery {outbox_id} is not a dead letter (already queued or delivered)"
            )
            query = f"notice={quote(notice)}" + (f"&token={quote(token)}" if token else "")
            self.send_response(303)
            self.send_header("Location", f"/?{query}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _offered_token(self, params: dict[str, list[str]]) -> str | None:
            """The token of a request: ``Authorization: Bearer``, else a form/query field."""
            header = self.headers.get("Authorization", "")
            if header.startswith("Bearer "):
                return header.removeprefix("Bearer ").strip()
            return params.get("token", [None])[0]

        def _status_page(self, page: StatusPage, params: dict[str, list[str]]) -> None:
            """The page, or 401 without the token it needs."""
            token = self._offered_token(params)
            if not page.allows(token):
                self._reply(401, "text/plain", b"the status page needs its token (?token=...)\n")
                return
            html = render_status_page(
                page.overview(),
                pipelines() if pipelines is not None else [],
                page.alarm_s,
                token=token if page.token is not None else None,
                notice=params.get("notice", [None])[0],
            )
            self._reply(200, "text/html; charset=utf-8", html.encode())

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Requests are not logged (health probes would flood the log)."""

    return Handler
