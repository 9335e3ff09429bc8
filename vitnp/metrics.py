"""The server's metrics, in Prometheus' terms: one Metrics per process (one per Ray Serve replica), made by
InferenceService (`service.metrics`), recorded by the HTTP layer (`request_finished`) and the service (the
rest), read as GET /metrics (`render`).

The names follow text-embeddings-inference's (te_request_count, te_request_duration, te_queue_duration,
te_inference_duration, te_batch_next_size, te_queue_size, ...), prefixed vitnp_, and so do the buckets:
durations from 15 microseconds up by a factor of 1.5 (35 buckets, past 5 minutes), batch sizes in powers of
two.

    vitnp_requests_total{model,route,status}        requests answered, by model, route template and status
    vitnp_request_duration_seconds{model,route}     time from the request's arrival to its answer
    vitnp_rejected_requests_total{model,reason}     answered 429 (queue_full) or 503 (loading, deadline)
    vitnp_queue_duration_seconds{model}             an image's wait from admission to its forward pass
    vitnp_inference_duration_seconds{model}         one forward pass (a whole batch)
    vitnp_queue_size{model}                         images admitted and not yet in a forward pass
    vitnp_batch_size{model}                         images per forward pass
    vitnp_images_classified_total{model}            images that went through a forward pass
    vitnp_cache_hits_total{model} / vitnp_cache_misses_total{model}   result-cache lookups
    vitnp_model_load_duration_seconds{model}        a model's load and warm-up
    vitnp_model_load_failures_total{model}          loads that failed

Backends: `Metrics` records into a private prometheus_client registry, which `render` writes out.
`RayMetrics` (made in Ray Serve replicas) records into the same kind of registry, so a replica's /metrics
answers that replica's own figures, and also into `ray.util.metrics`, so Ray's Prometheus export carries every
replica's figures: scrape that for the deployment's totals. Each node's metrics agent serves it at the node's
metrics export port (`ray start --metrics-export-port`), as ray_vitnp_requests_total, ..., one series per
replica (Ray's WorkerId label), a few seconds behind; there a histogram's _sum is Ray's estimate (bucket
midpoints), its buckets and counts are exact.
"""

from __future__ import annotations

import logging

log = logging.getLogger("vitnp.server")

PREFIX = "vitnp_"
DURATION_BUCKETS = tuple(0.00001 * 1.5 ** i for i in range(1, 36))
BATCH_SIZE_BUCKETS = tuple(float(2 ** i) for i in range(13))
REJECT_REASONS = ("queue_full", "loading", "deadline")

# name -> (kind, documentation, labels, buckets): the one list both backends build their instruments from.
INSTRUMENTS = {
    "requests": ("counter", "Requests answered, by model, route template and status", ("model", "route", "status"),
                 None),
    "request_duration_seconds": ("histogram", "Time from a request's arrival to its answer", ("model", "route"),
                                 DURATION_BUCKETS),
    "rejected_requests": ("counter", "Requests answered 429 (queue_full) or 503 (loading, deadline)",
                          ("model", "reason"), None),
    "queue_duration_seconds": ("histogram", "An image's wait from admission to its forward pass", ("model",),
                               DURATION_BUCKETS),
    "inference_duration_seconds": ("histogram", "One forward pass over a batch", ("model",), DURATION_BUCKETS),
    "queue_size": ("gauge", "Images admitted and not yet in a forward pass", ("model",), None),
    "batch_size": ("histogram", "Images per forward pass", ("model",), BATCH_SIZE_BUCKETS),
    "images_classified": ("counter", "Images that went through a forward pass", ("model",), None),
    "cache_hits": ("counter", "Result-cache lookups that found the answer", ("model",), None),
    "cache_misses": ("counter", "Result-cache lookups that did not", ("model",), None),
    "model_load_duration_seconds": ("histogram", "A model's load and warm-up", ("model",), DURATION_BUCKETS),
    "model_load_failures": ("counter", "Model loads that failed", ("model",), None),
}


class PrometheusBackend:
    """Instruments in a private prometheus_client registry (several servers in one process stay apart)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        # No *_created series: one per label set, and nothing an operator graphs (process-wide setting).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.instruments = {}
        for name, (kind, doc, labels, buckets) in INSTRUMENTS.items():
            if kind == "counter":
                metric = Counter(PREFIX + name, doc, labels, registry=self.registry)
            elif kind == "gauge":
                metric = Gauge(PREFIX + name, doc, labels, registry=self.registry)
            else:
                metric = Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)
            self.instruments[name] = metric

    def inc(self, name: str, labels: dict, amount: float = 1.0) -> None:
        self.instruments[name].labels(**labels).inc(amount)

    def observe(self, name: str, labels: dict, value: float) -> None:
        self.instruments[name].labels(**labels).observe(value)

    def set(self, name: str, labels: dict, value: float) -> None:
        self.instruments[name].labels(**labels).set(value)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RayBackend:
    """The same instruments through ray.util.metrics (exported by Ray for every replica)."""

    def __init__(self):
        from ray.util import metrics

        self.instruments = {}
        for name, (kind, doc, labels, buckets) in INSTRUMENTS.items():
            if kind == "counter":
                metric = metrics.Counter(PREFIX + name, doc, tag_keys=labels)
            elif kind == "gauge":
                metric = metrics.Gauge(PREFIX + name, doc, tag_keys=labels)
            else:
                metric = metrics.Histogram(PREFIX + name, doc, boundaries=list(buckets), tag_keys=labels)
            self.instruments[name] = metric

    def inc(self, name: str, labels: dict, amount: float = 1.0) -> None:
        self.instruments[name].inc(amount, tags=labels)

    def observe(self, name: str, labels: dict, value: float) -> None:
        self.instruments[name].observe(value, tags=labels)

    def set(self, name: str, labels: dict, value: float) -> None:
        self.instruments[name].set(value, tags=labels)


class Metrics:
    """What the server counts and times (the names: module docstring). Thread-safe: the event loop, the
    engine threads and the loader pool all record."""

    def __init__(self):
        self.local = PrometheusBackend()
        self.backends = [self.local]

    def _record(self, how: str, name: str, labels: dict, value: float) -> None:
        for backend in self.backends:
            try:
                getattr(backend, how)(name, labels, value)
            except Exception:  # noqa: BLE001 - a metric must never fail a request
                log.exception("recording metric %s failed", name)

    # ----------------------------------------------------------------- the HTTP layer

    def request_finished(self, model: str | None, route: str, status: int, seconds: float, images: int) -> None:
        """One answered request: route is the route template ("/models/{model_id}"), never the raw path;
        images: how many images it carried (0 when it never got that far)."""
        model = model or ""
        self._record("inc", "requests", {"model": model, "route": route, "status": str(status)}, 1)
        self._record("observe", "request_duration_seconds", {"model": model, "route": route}, seconds)

    def render(self) -> tuple[bytes, str]:
        """The body and Content-Type of GET /metrics: this process's (this replica's) figures in the Prometheus
        text format."""
        return self.local.render()

    # ----------------------------------------------------------------- the service

    def rejected(self, model: str, reason: str) -> None:
        """A request refused with 429 (reason "queue_full") or 503 ("loading", "deadline")."""
        self._record("inc", "rejected_requests", {"model": model, "reason": reason}, 1)

    def cache_lookup(self, model: str, hits: int, misses: int) -> None:
        if hits:
            self._record("inc", "cache_hits", {"model": model}, hits)
        if misses:
            self._record("inc", "cache_misses", {"model": model}, misses)

    def queue_size(self, model: str, images: int) -> None:
        self._record("set", "queue_size", {"model": model}, images)

    def queued(self, model: str, seconds: float) -> None:
        """One image left the queue for a forward pass after waiting this long."""
        self._record("observe", "queue_duration_seconds", {"model": model}, seconds)

    def forward_pass(self, model: str, images: int, seconds: float) -> None:
        labels = {"model": model}
        self._record("observe", "batch_size", labels, images)
        self._record("observe", "inference_duration_seconds", labels, seconds)
        self._record("inc", "images_classified", labels, images)

    def model_loaded(self, model: str, seconds: float) -> None:
        self._record("observe", "model_load_duration_seconds", {"model": model}, seconds)

    def model_load_failed(self, model: str) -> None:
        self._record("inc", "model_load_failures", {"model": model}, 1)


class RayMetrics(Metrics):
    """Metrics of a Ray Serve replica: its own /metrics, plus ray.util.metrics for Ray's Prometheus export."""

    def __init__(self):
        super().__init__()
        self.backends.append(RayBackend())
