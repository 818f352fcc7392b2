"""Prometheus metrics of one app (own registry) and the middleware that records every request."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # no *_created series: they double the output and nobody reads them

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests by route and status, latencies, batch sizes, queue depth, images processed."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("s4l_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("s4l_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("s4l_batch_size", "images per model call",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("s4l_batch_seconds", "seconds per model call",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("s4l_queue_depth", "images admitted and not yet answered", registry=r)
        self.images = Counter("s4l_images", "images processed by route and outcome",
                              ["route", "outcome"], registry=r)
        self.backend = Gauge("s4l_backend_info", "the inference backend and its precision (value 1)",
                             ["backend", "precision", "provider"], registry=r)

    def backend_info(self, backend: str, precision: str, provider: str) -> None:
        self.backend.labels(backend, precision, provider).set(1)

    # BatchObserver
    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def queue_depth(self, images: int) -> None:
        self.queue.set(images)


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request by route template and status."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status = {"code": 500}
        t0 = time.perf_counter()

        async def _send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            # The matched route's template (/v2/models/{name}/infer), set on the scope by the
            # router; unmatched paths count as "other" (bounded label cardinality).
            template = getattr(scope.get("route"), "path", None)
            route = template if template in self.routes else path if path in self.routes else "other"
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
