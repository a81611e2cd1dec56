"""
The cloud server's Prometheus metrics, in a registry of its own.

Each :class:`ServerMetrics` has its own ``CollectorRegistry`` (not prometheus_client's global
one), so several servers can live in one process; the shutdown summary line is read back from
the same registry, so the log and the scrape never disagree.
"""
from __future__ import annotations

import threading
from typing import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = 'speculative_av_'
STATUSES = ('ok', 'late_rejected', 'dropped_unreachable', 'expired', 'cancelled', 'invalid',
            'refused', 'unavailable', 'failed')
TIMELINESS = ('in_time', 'late', 'no_deadline')
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                   0.75, 1.0, 2.5, 5.0)


class ServerMetrics:
    """Counters and histograms of one server; see README, 'Serving a fleet'."""

    def __init__(self, max_batch_size: int, queue_depth: Callable[[], float]) -> None:
        """Create the metrics; ``queue_depth`` is read at every scrape."""
        self.registry = CollectorRegistry()
        self._requests = Counter(f'{PREFIX}requests', 'Detect requests by how they ended',
                                 ['status'], registry=self.registry)
        for status in STATUSES:
            self._requests.labels(status)
        self._replies = Counter(
            f'{PREFIX}replies', 'Successful replies, sent before or after their deadline',
            ['timeliness'], registry=self.registry)
        for timeliness in TIMELINESS:
            self._replies.labels(timeliness)
        self._queue = Histogram(f'{PREFIX}queue_seconds',
                                'Time from admission to the start of inference',
                                buckets=SECONDS_BUCKETS, registry=self.registry)
        self._inference = Histogram(f'{PREFIX}inference_seconds',
                                    'Time of one forward pass (a whole batch)',
                                    buckets=SECONDS_BUCKETS, registry=self.registry)
        self._batch_sizes = Histogram(f'{PREFIX}batch_size', 'Requests per forward pass',
                                      buckets=tuple(range(1, max_batch_size + 1)),
                                      registry=self.registry)
        self._max_batch_size = max_batch_size
        Gauge(f'{PREFIX}queue_depth', 'Requests waiting for inference',
              registry=self.registry).set_function(queue_depth)
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def count(self, status: str) -> None:
        """Count one request that ended with ``status`` (one of STATUSES)."""
        self._requests.labels(status).inc()

    def queued(self, seconds: float) -> None:
        """Record one request's wait before inference."""
        self._queue.observe(seconds)

    def batch(self, size: int, inference_s: float) -> None:
        """Record one forward pass."""
        self._batch_sizes.observe(size)
        self._inference.observe(inference_s)

    def replied(self, timeliness: str) -> None:
        """Record one successful reply as 'in_time', 'late' or 'no_deadline'."""
        self._replies.labels(timeliness).inc()

    def serve(self, port: int, host: str = '0.0.0.0') -> int:
        """Serve /metrics over HTTP on ``port`` (0: a free one) in a daemon thread; return it."""
        self._http, self._http_thread = start_http_server(port, host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if serving."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._http_thread is not None:
            self._http_thread.join(5.0)

    def _value(self, name: str, **labels: str) -> int:
        value = self.registry.get_sample_value(f'{PREFIX}{name}', labels)
        return int(value or 0)

    def batch_size_counts(self) -> dict[int, int]:
        """Return how many forward passes had each batch size (sizes that occurred)."""
        cumulative = [self._value('batch_size_bucket', le=f'{float(size)}')
                      for size in range(1, self._max_batch_size + 1)]
        counts = {size: count - previous for size, count, previous
                  in zip(range(1, self._max_batch_size + 1), cumulative, [0, *cumulative])}
        return {size: count for size, count in counts.items() if count}

    def summary(self) -> str:
        """Return the counts by status, replies in time, inferences and the batch sizes."""
        counts = {status: self._value('requests_total', status=status) for status in STATUSES}
        fields = {'requests': sum(counts.values()), **counts}
        fields.update({timeliness: self._value('replies_total', timeliness=timeliness)
                       for timeliness in TIMELINESS})
        sizes = self.batch_size_counts()
        batches = sum(sizes.values())
        fields['inferences'] = sum(size * count for size, count in sizes.items())
        fields['batches'] = batches
        mean_ms = (self.registry.get_sample_value(f'{PREFIX}inference_seconds_sum') or 0.0) * (
            1e3 / batches if batches else 0.0)
        histogram = ','.join(f'{size}:{count}' for size, count in sizes.items()) or 'none'
        return ' '.join(f'{key}={value}' for key, value in fields.items()) + (
            f' mean_batch_inference_ms={mean_ms:.1f} batch_sizes={histogram}')
