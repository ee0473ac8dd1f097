"""The service's counters and histograms, exposed on /healthz and /metrics (Prometheus text format)."""

from __future__ import annotations

import threading
import time
from typing import Any

from runner.workloads.serving.batcher import MicroBatcher


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count (observed from several threads)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = next((k for k, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        with self._lock:
            self.counts[i] += 1
            self.sum += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        sep = "," if labels else ""
        out, acc = [], 0
        for b, c in zip((*self.bounds, float("inf")), counts, strict=True):
            acc += c
            le = "+Inf" if b == float("inf") else f"{b:g}"
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {acc}')
        out.append(f"{name}_sum{{{labels}}} {total:.6f}" if labels else f"{name}_sum {total:.6f}")
        out.append(f"{name}_count{{{labels}}} {acc}" if labels else f"{name}_count {acc}")
        return out


class Metrics:
    """What /metrics reports: HTTP requests by path and status, their latency, and the batcher's counters."""

    LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128)

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.batch_size = Histogram(self.BATCH_BOUNDS)
        self._lock = threading.Lock()

    def request(self, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            hist = self.latency.setdefault(path, Histogram(self.LATENCY_BOUNDS))
        hist.observe(seconds)

    def render(self, batcher: MicroBatcher, model: str) -> str:
        with self._lock:
            requests = sorted(self.requests.items())
            latency = sorted(self.latency.items())
        out = [
            "# HELP qa_info The served model.", "# TYPE qa_info gauge", f'qa_info{{model="{_label(model)}"}} 1',
            "# HELP qa_http_requests_total HTTP requests by path and status code.",
            "# TYPE qa_http_requests_total counter",
        ]
        out += [f'qa_http_requests_total{{path="{p}",code="{c}"}} {n}' for (p, c), n in requests]
        out += ["# HELP qa_http_request_seconds Time from request to response.",
                "# TYPE qa_http_request_seconds histogram"]
        for p, h in latency:
            out += h.lines("qa_http_request_seconds", f'path="{p}"')
        out += ["# HELP qa_batch_questions Questions answered per forward pass.", "# TYPE qa_batch_questions histogram"]
        out += self.batch_size.lines("qa_batch_questions")
        for name, kind, value, text in (
            ("qa_queue_requests", "gauge", batcher.queue.qsize(), "Requests waiting for a forward pass."),
            ("qa_batches_total", "counter", batcher.batches, "Forward passes run."),
            ("qa_answered_total", "counter", batcher.items, "Questions answered by the model."),
            ("qa_fallbacks_total", "counter", batcher.fallbacks, "Questions answered by the fallback (deadline)."),
        ):
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class RequestMetrics:
    """ASGI middleware: counts every HTTP request by its route's path (unknown paths as "other") and status."""

    def __init__(self, app: Any, metrics: Metrics, paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        status = 500

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.request(path if path in self.paths else "other", status, time.monotonic() - t0)
