"""Prometheus metrics of live runs, served over HTTP for their life (``--prometheus-port``).

One :class:`MetricsBoard` holds the metrics of every stream a process runs, each sample under
its ``stream`` label, in one registry served on one port. Its registry is its own (not
prometheus_client's global one), so several boards in one process, and tests, never collide.
The frame counters are not counted a second time here: they are read, at each scrape, from the
counts each run keeps anyway (the same numbers its jsonl summary is made of), so the two agree by
construction. Only the latency histogram is fed as the maps come
(:meth:`RunMetrics.observe_latency`).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .config import MonitoringConfig
from .errors import ScoreCamError

log = logging.getLogger(__name__)

# Frame arrival -> map ready, in seconds: a GPU map in tens of ms to a CPU VGG16 in minutes.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class RunCounts:
    """What a live run has done so far (the counters) and its workers up now (a gauge)."""

    frames_in: int = 0
    frames_written: int = 0
    frames_explained: int = 0
    frames_dropped: int = 0
    reconnects: int = 0
    workers_alive: int = 0


_COUNTERS = {
    "frames_in": "Frames read from the input",
    "frames_written": "Frames written to the output",
    "frames_explained": "Frames explained (a Score-CAM map made)",
    "frames_dropped": "Frames dropped because the encoder fell behind the source",
    "reconnects": "Reopenings of the input that worked",
}


def stream_label(input_path: str) -> str:
    """Return the ``stream`` label of an input: as given, without a URL's ``user:password@``."""
    parts = urlsplit(input_path)
    if "@" not in parts.netloc:
        return input_path
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


class RunMetrics:
    """One stream's metrics on a :class:`MetricsBoard`: counts read from :meth:`track`'s
    callable, and its child of the board's latency histogram."""

    def __init__(self, stream: str, latency: Histogram) -> None:
        self.stream = stream
        self._latency = latency
        self._counts: Callable[[], RunCounts] = RunCounts  # all zero until the run tracks
        self._lock = threading.Lock()

    def track(self, counts: Callable[[], RunCounts]) -> None:
        """Read the counts from ``counts()`` at each scrape from now on (any thread calls it)."""
        with self._lock:
            self._counts = counts

    def observe_latency(self, seconds: float) -> None:
        """Count one explained frame's latency in the histogram."""
        self._latency.observe(seconds)

    def counts(self) -> RunCounts:
        """Return the stream's counts now, from the callable it tracks."""
        with self._lock:
            counts = self._counts
        return counts()


class MetricsBoard:
    """The metrics of several streams in one registry: ``board[stream]`` is one's
    :class:`RunMetrics`; every family has one sample per stream (``labels``, in that order).

    ValueError when two streams have the same label, or there is none.
    """

    def __init__(self, streams: Sequence[str]) -> None:
        if not streams:
            raise ValueError("a metrics board needs at least one stream")
        repeated = sorted(s for s, n in Counter(streams).items() if n > 1)
        if repeated:
            raise ValueError(f"stream labels must differ: {', '.join(map(repr, repeated))}")
        self.registry = CollectorRegistry()
        self.registry.register(self)  # collect() below: the counters and the gauge
        latency = Histogram(
            "scorecam_latency_seconds",
            "Frame arrival to its map ready, in seconds",
            ["stream"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.labels = tuple(streams)
        self._streams = {s: RunMetrics(s, latency.labels(s)) for s in streams}

    def __getitem__(self, stream: str) -> RunMetrics:
        """Return the metrics of ``stream`` (KeyError if the board has no such label)."""
        return self._streams[stream]

    def collect(self) -> Iterator[Metric]:
        """Yield the counters and the gauge (the registry calls this at each scrape)."""
        counts = {stream: metrics.counts() for stream, metrics in self._streams.items()}
        for name, help_text in _COUNTERS.items():
            counter = CounterMetricFamily(f"scorecam_{name}", help_text, labels=["stream"])
            for stream, count in counts.items():
                counter.add_metric([stream], getattr(count, name))
            yield counter
        gauge = GaugeMetricFamily(
            "scorecam_workers_alive", "Workers up (1 in-process)", labels=["stream"]
        )
        for stream, count in counts.items():
            gauge.add_metric([stream], count.workers_alive)
        yield gauge

    def text(self) -> str:
        """Return the metrics in Prometheus' text format, as a scrape gets them."""
        return generate_latest(self.registry).decode()


class MetricsServer:
    """Serves a :class:`MetricsBoard` at ``http://ADDR:PORT/metrics`` in a thread until closed."""

    def __init__(self, board: MetricsBoard, port: int, addr: str) -> None:
        self.port, self.addr = port, addr
        try:
            self._server, self._thread = start_http_server(port, addr, registry=board.registry)
        except OSError as err:  # in use, no permission, an address not of this host
            why = err.strerror or str(err)
            raise ScoreCamError(
                f"--prometheus-port {port}: cannot listen on {addr}: {why}"
            ) from None
        log.info("Prometheus metrics at http://%s:%d/metrics", addr, port)

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(
    config: MonitoringConfig, streams: Sequence[str]
) -> tuple[MetricsBoard, MetricsServer]:
    """Return the metrics of ``streams`` (one per label) and their server, listening already.

    ScoreCamError if it cannot listen; ValueError when two labels are the same.
    """
    assert config.prometheus_port is not None
    board = MetricsBoard(streams)
    return board, MetricsServer(board, config.prometheus_port, config.prometheus_addr)
