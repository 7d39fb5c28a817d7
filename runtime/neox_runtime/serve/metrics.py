"""Prometheus metrics under vLLM's names (`vllm:` prefix) plus `neox:` for what vLLM lacks.

Using vLLM's names lets existing Grafana dashboards, KEDA/HPA rules and the operator's
load-based scaling read this server unchanged. Each server has its own registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Sequences in the running batch.", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Sequences waiting for a KV-cache slot.", labels, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache positions in use (0-1).", labels, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive output tokens.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token, per sequence.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens prefilled.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels, registry=r)
        self.success = Counter("vllm:request_success", "Finished sequences by reason.",
                               labels + ["finished_reason"], registry=r)
        self.refused = Counter("neox:requests_refused", "Requests refused before the engine, by reason.",
                               labels + ["reason"], registry=r)
        self.steps = Counter("neox:engine_steps", "Engine steps executed.", labels, registry=r)
        self.model_name = model_name
        # The engine records several observations per token; `labels()` takes a lock and a
        # dict lookup each call, so its children are bound to this server's model once.
        m = model_name
        self._running, self._waiting, self._kv_usage = (g.labels(m) for g in (self.running, self.waiting,
                                                                               self.kv_usage))
        self._ttft, self._itl, self._e2e = self.ttft.labels(m), self.itl.labels(m), self.e2e.labels(m)
        self._prompt_tokens, self._generation_tokens = self.prompt_tokens.labels(m), self.generation_tokens.labels(m)
        self._steps = self.steps.labels(m)

    def engine_state(self, running: int, waiting: int, kv_usage: float) -> None:
        """After every engine step."""
        self._running.set(running)
        self._waiting.set(waiting)
        self._kv_usage.set(kv_usage)
        self._steps.inc()

    def first_token(self, seconds_since_arrival: float, prompt_tokens: int) -> None:
        self._ttft.observe(seconds_since_arrival)
        self._prompt_tokens.inc(prompt_tokens)

    def next_token(self, seconds_since_previous: float) -> None:
        self._itl.observe(seconds_since_previous)

    def generated(self, tokens: int) -> None:
        self._generation_tokens.inc(tokens)

    def finished(self, seconds_since_arrival: float, reason: str) -> None:
        self._e2e.observe(seconds_since_arrival)
        self.success.labels(self.model_name, reason).inc()
