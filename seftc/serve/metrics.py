"""The server's Prometheus metrics (prometheus_client, one registry per server so that several can
live in one process): requests by endpoint and status, tokens in and out, queue depth and batch size,
time to first token, inter-token latency and request duration histograms, engine step counters."""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# seconds; decode steps of a small model on a CPU take milliseconds, a queued prefill seconds
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_DURATION = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, engine: Any):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("seftc_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("seftc_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("seftc_generation_tokens", "Tokens generated", registry=r)
        self.cancelled = Counter("seftc_requests_cancelled", "Requests dropped because their client went away", registry=r)
        self.rejected = Counter("seftc_requests_rejected", "Requests refused before decoding, by reason", ["reason"],
                                registry=r)
        self.ttft = Histogram("seftc_time_to_first_token_seconds", "From admission to the first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("seftc_inter_token_latency_seconds", "Between consecutive tokens of one request",
                             buckets=_LATENCY, registry=r)
        self.duration = Histogram("seftc_request_duration_seconds", "From admission to the last token",
                                  buckets=_DURATION, registry=r)
        Gauge("seftc_requests_waiting", "Requests queued, not yet in the batch (queue depth)",
              registry=r).set_function(lambda: engine.waiting)
        Gauge("seftc_requests_running", "Requests in the running batch", registry=r).set_function(lambda: engine.running)
        Gauge("seftc_engine_peak_batch", "Largest batch one decode step has run", registry=r).set_function(
            lambda: engine.stats.peak_batch)
        Gauge("seftc_engine_decode_steps", "Decode forwards run (one per token of every row in the batch)",
              registry=r).set_function(lambda: engine.stats.steps)
        Gauge("seftc_engine_decode_rows", "Rows over all decode forwards (divided by steps: the mean batch)",
              registry=r).set_function(lambda: engine.stats.decode_rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
