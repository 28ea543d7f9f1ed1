"""Counters of `prefixd serve-models`, rendered in the Prometheus text format (`GET /metrics`).

    metrics = ServingMetrics()
    metrics.request("capitals", 200); metrics.tokens("capitals", 5); metrics.step(8, 0.012)
    print(metrics.render())

Series (all prefixed prefixd_serving_): requests_total{model,code} (model "-" when the request named no
model that resolved: labels never carry arbitrary input), prompt_tokens_total{model},
completion_tokens_total{model}, rejected_total{reason}, queue_seconds (histogram: wait before joining the
batch), batch_size (histogram: rows per decoding step), step_seconds_total and steps_total, queue_depth{base}
(gauge), tokens_per_second (gauge: generated tokens over the last `window_s` seconds), prefixes_loaded,
prefix_bytes_loaded (gauges) and prefix_evictions_total.
"""

from __future__ import annotations

import collections
import threading
import time

QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
P = "prefixd_serving_"


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{edge}"}} {c}' for edge, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class ServingMetrics:
    """Thread-safe counters; every method is cheap (called from the decoding threads too)."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._lock = threading.Lock()
        self._requests: collections.Counter = collections.Counter()
        self._prompt: collections.Counter = collections.Counter()
        self._completion: collections.Counter = collections.Counter()
        self._rejected: collections.Counter = collections.Counter()
        self._depth: dict[str, int] = {}
        self._queue = _Histogram(QUEUE_BUCKETS)
        self._batch = _Histogram(BATCH_BUCKETS)
        self._step_seconds = 0.0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._loaded = (0, 0)
        self._evictions = 0

    def request(self, model: str, code: int, prompt_tokens: int = 0) -> None:
        with self._lock:
            self._requests[(model, code)] += 1
            self._prompt[model] += prompt_tokens

    def tokens(self, model: str, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._completion[model] += n
            self._recent.append((now, n))

    def rejected(self, reason: str) -> None:
        with self._lock:
            self._rejected[reason] += 1

    def queue_depth(self, base: str, depth: int) -> None:
        with self._lock:
            self._depth[base] = depth

    def queued(self, seconds: float) -> None:
        with self._lock:
            self._queue.observe(seconds)

    def step(self, rows: int, seconds: float) -> None:
        with self._lock:
            self._batch.observe(rows)
            self._step_seconds += seconds

    def loaded(self, prefixes: int, nbytes: int) -> None:
        with self._lock:
            self._loaded = (prefixes, nbytes)

    def evicted(self) -> None:
        with self._lock:
            self._evictions += 1

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window_s

    def rejected_count(self, reason: str) -> int:
        with self._lock:
            return self._rejected[reason]

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        rate = self.tokens_per_second()
        with self._lock:
            lines = [f"# TYPE {P}requests_total counter"]
            lines += [
                f'{P}requests_total{{model="{_label(m)}",code="{c}"}} {n}'
                for (m, c), n in sorted(self._requests.items())
            ]
            for name, counter in (("prompt_tokens_total", self._prompt), ("completion_tokens_total", self._completion)):
                lines.append(f"# TYPE {P}{name} counter")
                lines += [f'{P}{name}{{model="{_label(m)}"}} {n}' for m, n in sorted(counter.items())]
            lines.append(f"# TYPE {P}rejected_total counter")
            lines += [f'{P}rejected_total{{reason="{_label(r)}"}} {n}' for r, n in sorted(self._rejected.items())]
            lines += self._queue.lines(f"{P}queue_seconds") + self._batch.lines(f"{P}batch_size")
            lines += [f"# TYPE {P}steps_total counter", f"{P}steps_total {self._batch.count}"]
            lines += [f"# TYPE {P}step_seconds_total counter", f"{P}step_seconds_total {self._step_seconds}"]
            lines.append(f"# TYPE {P}queue_depth gauge")
            lines += [f'{P}queue_depth{{base="{_label(b)}"}} {d}' for b, d in sorted(self._depth.items())]
            lines += [f"# TYPE {P}tokens_per_second gauge", f"{P}tokens_per_second {rate}"]
            lines += [f"# TYPE {P}prefixes_loaded gauge", f"{P}prefixes_loaded {self._loaded[0]}"]
            lines += [f"# TYPE {P}prefix_bytes_loaded gauge", f"{P}prefix_bytes_loaded {self._loaded[1]}"]
            lines += [f"# TYPE {P}prefix_evictions_total counter", f"{P}prefix_evictions_total {self._evictions}"]
        return "\n".join(lines) + "\n"
