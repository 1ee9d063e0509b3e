"""Server metrics in Prometheus' text format (a handful of counters, gauges and two histograms).

Updated from the scheduler thread and the event loop; plain ints and floats under the GIL are
enough for counters read by a scraper.
"""
from __future__ import annotations

import bisect
import collections
import time

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return out + [f"{name}_sum {self.total}", f"{name}_count {self.n}"]


class Metrics:
    def __init__(self):
        self.ttft, self.itl = Histogram(), Histogram()
        self.requests = collections.Counter()  # (endpoint, status class) -> count
        self.prompt_tokens = self.generation_tokens = self.rejected = 0
        self._recent: collections.deque[float] = collections.deque()  # token times of the last window

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self._token()

    def next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self._token()

    def _token(self) -> None:
        self.generation_tokens += 1
        now = time.monotonic()
        self._recent.append(now)
        while self._recent and now - self._recent[0] > 10.0:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        recent = [t for t in self._recent if now - t <= 10.0]
        return len(recent) / 10.0

    def render(self, running: int, waiting: int) -> str:
        p = "neoformer"
        lines = [
            f"# TYPE {p}_requests_running gauge", f"{p}_requests_running {running}",
            f"# TYPE {p}_requests_waiting gauge", f"{p}_requests_waiting {waiting}",
            f"# TYPE {p}_generation_tokens_per_second gauge",
            f"{p}_generation_tokens_per_second {self.tokens_per_second()}",
            f"# TYPE {p}_prompt_tokens_total counter", f"{p}_prompt_tokens_total {self.prompt_tokens}",
            f"# TYPE {p}_generation_tokens_total counter", f"{p}_generation_tokens_total {self.generation_tokens}",
            f"# TYPE {p}_queue_rejections_total counter", f"{p}_queue_rejections_total {self.rejected}",
            f"# TYPE {p}_requests_total counter",
            *(f'{p}_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())),
            f"# TYPE {p}_time_to_first_token_seconds histogram", *self.ttft.lines(f"{p}_time_to_first_token_seconds"),
            f"# TYPE {p}_inter_token_latency_seconds histogram", *self.itl.lines(f"{p}_inter_token_latency_seconds"),
        ]
        return "\n".join(lines) + "\n"
