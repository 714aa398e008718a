"""Prometheus metrics of the server (``GET /metrics``), via ``prometheus-client``.

Each app gets its own ``CollectorRegistry`` so several servers (tests, benchmarks) can live in
one process without clashing names. Labels: ``model`` is the base id or the adapter name;
on a server with a keys file every owned adapter is counted as ``private``
(:func:`lorakit.serve.auth.metrics_label`): ``/metrics`` is open and must not name them.
"""

from __future__ import annotations

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServeMetrics:
    """Counters and histograms per model (base or adapter)."""

    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "Requests finished, by model and HTTP status",
                                ["model", "status"], registry=self.registry)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens processed",
                                     ["model"], registry=self.registry)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated",
                                         ["model"], registry=self.registry)
        self.latency = Histogram("lorakit_request_latency_seconds",
                                 "Time from request to last token", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds",
                              "Time from request to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        running = Gauge("lorakit_requests_running", "Requests in the decode batch",
                        registry=self.registry)
        waiting = Gauge("lorakit_requests_waiting", "Requests queued", registry=self.registry)
        resident = Gauge("lorakit_adapters_resident", "Adapters loaded in memory",
                         registry=self.registry)
        running.set_function(lambda: engine.occupancy()["running"])
        waiting.set_function(lambda: engine.occupancy()["waiting"])
        resident.set_function(lambda: engine.occupancy()["resident_adapters"])

    def observe(self, model: str, status: int, prompt_tokens: int = 0, completion_tokens: int = 0,
                latency: float | None = None, ttft: float | None = None) -> None:
        self.requests.labels(model, str(status)).inc()
        if prompt_tokens:
            self.prompt_tokens.labels(model).inc(prompt_tokens)
        if completion_tokens:
            self.generation_tokens.labels(model).inc(completion_tokens)
        if latency is not None:
            self.latency.labels(model).observe(latency)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
