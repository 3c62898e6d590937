"""Prometheus metrics and a health check, served over HTTP when configured.

``[metrics] listen = "127.0.0.1:9464"`` starts a small HTTP listener with:

``/metrics``
    Prometheus text format (``prometheus-client``): counters of emails sent,
    deferred, scheduled, dead-lettered and failed, of throttling replies,
    relay outages, unexpected errors and refused writes; gauges of messages
    in flight, seconds since the checkpoint was last known good, whether the
    feed is connected, whether the relay is paused and the rate paced at,
    whether this process holds its slot's lease or waits as a standby, and
    when it started (each restart is a new value); a histogram of the time
    each accepted email took to deliver.
``/healthz``
    ``200 {"status": "ok"}`` while the feed is connected and the checkpoint is
    fresh, ``200 {"status": "standby"}`` while it waits for the lease, ``503
    {"status": "unhealthy", "reasons": [...]}`` otherwise.

Counters are read from the worker's own counters at scrape time, so the hot
path pays nothing for them; only the latency histogram is fed per email.
Each worker has its own registry, so several can run in one process (tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Self

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from notifier.worker import Worker

log = logging.getLogger(__name__)

_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: When this process started (for restart-loop alerts: each start is a new value).
_STARTED = time.time()


class _WorkerCollector(Collector):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        w, st = self._worker, self._worker.stats
        label = {"worker": str(w.settings.shard)}
        for name, doc, value in (
            ("notifier_emails_sent", "Emails accepted by the SMTP server.", st.sent),
            (
                "notifier_emails_dead_lettered",
                "Messages marked as undeliverable.",
                st.dead_lettered,
            ),
            (
                "notifier_emails_deferred",
                "Temporary failures written as deferrals, to be retried on the schedule.",
                st.deferred,
            ),
            (
                "notifier_emails_scheduled",
                "Messages held until their sendAt.",
                st.scheduled,
            ),
            (
                "notifier_delivery_failures",
                "Delivery attempts that failed (deferred or dead-lettered).",
                st.deferred + st.dead_lettered,
            ),
            (
                "notifier_throttled",
                "Throttling replies from the relay (each slows the sender down).",
                w.delivery.throttled,
            ),
            (
                "notifier_relay_outages",
                "Times sending was paused because the relay looked down.",
                w.delivery.breaker.opened,
            ),
            (
                "notifier_unexpected_errors",
                "Deliveries that failed with an unexpected error (a bug or a broken template).",
                w.delivery.crashes,
            ),
            (
                "notifier_documents_unwritable",
                "Claims, marks or deferrals that CouchDB refused for one document "
                "(a validation function).",
                st.unwritable,
            ),
            (
                "notifier_claim_conflicts",
                "Claims lost to another worker's write (409): two layouts overlap.",
                st.claim_conflicts,
            ),
            (
                "notifier_claim_waits",
                "Looks at a message while another worker held its claim.",
                st.claim_waits,
            ),
            (
                "notifier_claim_takeovers",
                "Claims taken over from a worker that crashed or stopped mid-send.",
                st.takeovers,
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=["worker"])
            counter.add_metric(list(label.values()), value)
            yield counter
        for name, doc, gauge_value in (
            ("notifier_in_flight", "Messages being delivered or marked now.", w.in_flight),
            (
                "notifier_checkpoint_age_seconds",
                "Seconds since the checkpoint was last known to be saved.",
                time.monotonic() - w.checkpoint_ok_at,
            ),
            ("notifier_feed_connected", "1 while the changes feed is connected.", w.feed.connected),
            (
                "notifier_relay_paused",
                "1 while sending is paused because the relay looks down.",
                w.delivery.paused,
            ),
            (
                "notifier_send_rate_limit",
                "Messages per second this worker paces at now (0: no limit).",
                w.delivery.pacer.limit or 0.0,
            ),
            (
                "notifier_lease_held",
                "1 while this process holds its worker slot's lease.",
                w.lease_held,
            ),
            (
                "notifier_standby",
                "1 while this process waits as a standby for its slot's lease.",
                w.standing_by is not None,
            ),
            (
                "notifier_start_time_seconds",
                "When this process started, in seconds since the epoch.",
                _STARTED,
            ),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["worker"])
            gauge.add_metric(list(label.values()), float(gauge_value))
            yield gauge


class Observability:
    """The metrics registry of one worker, and the HTTP listener that serves it."""

    def __init__(self, worker: Worker, *, host: str, port: int) -> None:
        self.worker = worker
        self.host = host
        self.port = port
        self.registry = CollectorRegistry()
        # Fresh while a checkpoint pass succeeded within three intervals (and
        # ten seconds of slack for a slow CouchDB).
        self.stale_after = 3 * worker.settings.checkpoint_interval + 10.0
        self.registry.register(_WorkerCollector(worker))
        self.send_seconds = Histogram(
            "notifier_send_seconds",
            "Seconds from handing a message to SMTP to its acceptance.",
            ["worker"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        ).labels(worker=str(worker.settings.shard))
        worker.on_delivered = self.send_seconds.observe
        self._server: asyncio.Server | None = None

    def health(self) -> tuple[bool, list[str]]:
        """Whether the worker is healthy, and why not.

        A standby is healthy: waiting for the lease is its job.
        """
        if self.worker.standing_by is not None:
            return True, []
        reasons = []
        if not self.worker.feed.connected:
            reasons.append("the changes feed is not connected")
        age = time.monotonic() - self.worker.checkpoint_ok_at
        if age > self.stale_after:
            reasons.append(f"the checkpoint has not been saved for {age:.0f}s")
        return not reasons, reasons

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics, health on /healthz", self.host, self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers: nothing here needs them
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"only GET\n"
            elif path == "/metrics":
                status, ctype, body = 200, _CONTENT_TYPE, generate_latest(self.registry)
            elif path == "/healthz":
                ok, reasons = self.health()
                state = "standby" if self.worker.standing_by is not None else "ok"
                payload = {"status": state} if ok else {"status": "unhealthy", "reasons": reasons}
                status, ctype, body = (
                    (200 if ok else 503),
                    "application/json",
                    (json.dumps(payload).encode() + b"\n"),
                )
            else:
                status, ctype, body = 404, "text/plain", b"not found: try /metrics or /healthz\n"
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(
                status, "Service Unavailable"
            )
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head + (b"" if parts and parts[0] == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass  # a client that goes quiet or away gets nothing
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
