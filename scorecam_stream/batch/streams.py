"""Several live streams in one run: each its own reader, encoder and outputs, one explainer.

``scorecam-video udp://:23000 rtsp://cam2/s -o out/ --workers 2``: every stream runs the live
loop (:func:`~scorecam_stream.pipeline.run`) in a thread of its own, writing
``out/<name>.m3u8`` (and ``--jsonl DIR/`` ``DIR/<name>.jsonl``...), all lent the one explainer
(one model in-process, taken in turn; or one Ray pool serving the streams' frames first come,
first served), so no stream starves. Names come from ``--name`` (one per input, in order) or
from the URL; two equal names are a mistake. A stream that fails or ends leaves the others
running; Ctrl-C or SIGTERM stops them all as it stops one live run: each finishes its outputs.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import torch

from .. import monitoring
from ..config import Config
from ..config_batch import BatchConfig
from ..errors import ScoreCamError, first_line
from ..models import ModelMeta
from ..monitoring import RunMetrics
from ..pipeline import run
from ..records import FrameResult, FrameTask
from ..reuse import ReuseOptions
from ..targets import parse as parse_target
from ..workers import Explainer, LocalExplainer, OwnedExplainer
from .jobs import Job, config_for, make_output_dirs
from .records import BatchProgress, BatchResult, SummaryWriter, VideoRecord
from .shared import SharedExplainer, arrivals

log = logging.getLogger(__name__)
P = TypeVar("P")

STREAM_SUFFIX = ".m3u8"  # a stream's video output in the output directory: HLS, playable live


def stream_name(url: str) -> str:
    """Return a file name for a stream: its host, port and path (``cam2-s``, ``udp-23000``)."""
    if url == "-":
        return "stdin"
    parts = urlsplit(url)
    host = parts.hostname or ""
    local = host in ("", "0.0.0.0", "127.0.0.1", "localhost", "::", "::1")
    words = [parts.scheme if local else host]
    if parts.port is not None:
        words.append(str(parts.port))
    words += [p for p in parts.path.split("/") if p]
    name = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", w).strip("._") for w in words if w)
    return name or "stream"


def plan_streams(inputs: Sequence[str], batch: BatchConfig) -> list[Job]:
    """Return each stream's job: ``<output_dir>/<name>.m3u8`` and its side outputs.

    Raises ScoreCamError without an output directory, for a ``--name`` count that does not
    match the inputs, or for two streams of the same name.
    """
    if batch.output_dir is None:
        raise ScoreCamError("several live streams need an output directory: -o DIR/")
    names = list(batch.names) if batch.names else [stream_name(item) for item in inputs]
    if len(names) != len(inputs):
        raise ScoreCamError(
            f"{len(batch.names)} --name for {len(inputs)} live inputs: give one each"
        )
    seen: dict[str, str] = {}
    for item, name in zip(inputs, names, strict=True):
        if name in seen:
            raise ScoreCamError(
                f"{seen[name]} and {item} are both named '{name}': give each a --name"
            )
        seen[name] = item

    def side(directory: str | None, suffix: str, name: str) -> Path | None:
        return Path(directory) / f"{name}{suffix}" if directory else None

    return [
        Job(
            input=item,
            output=Path(batch.output_dir) / f"{name}{STREAM_SUFFIX}",
            save_maps=side(batch.maps_dir, ".maps.npz", name),
            jsonl=side(batch.jsonl_dir, ".jsonl", name),
            preview=side(batch.preview_dir, ".preview.png", name),
        )
        for item, name in zip(inputs, names, strict=True)
    ]


def run_streams(
    base: Config,
    batch: BatchConfig,
    inputs: Sequence[str],
    explainer_factory: Callable[..., OwnedExplainer],
    on_record: Callable[[VideoRecord, BatchProgress], None] | None = None,
) -> BatchResult:
    """Run every live stream of ``inputs`` until it ends or the run is stopped; return records.

    ``explainer_factory(config, live=True)`` makes the one explainer, closed at the end.
    A stream's ScoreCamError is its record's reason (the others go on); an interrupt
    (KeyboardInterrupt, SIGTERM's Terminated) stops every stream, which finish their outputs.
    """
    began = time.perf_counter()
    if batch.video_tasks:
        raise ScoreCamError("--video-tasks runs files as Ray tasks; live streams run here")
    jobs = plan_streams(inputs, batch)
    make_output_dirs(batch)
    configs = [config_for(base, job) for job in jobs]
    with contextlib.ExitStack() as stack:
        boards = _serve_metrics(base, jobs, stack)
        # The model loads (or Ray starts) while the streams' readers start: no source waits.
        explainer = _Loading(lambda: explainer_factory(base, live=True))
        stack.callback(explainer.close)
        summary = SummaryWriter(batch.summary, list(inputs))
        stack.callback(summary.close)
        streams = _Streams(configs, jobs, explainer, boards, summary, on_record)
        streams.run(lambda: parse_target(base.explain.target, explainer.meta.class_names))
    order = {job.input: i for i, job in enumerate(jobs)}
    records = sorted(summary.records, key=lambda r: order[r.input])
    return BatchResult(tuple(records), time.perf_counter() - began)


def _serve_metrics(
    base: Config, jobs: list[Job], stack: contextlib.ExitStack
) -> dict[str, RunMetrics]:
    """Return each stream's Prometheus metrics, all served on one port (none without one).

    Each stream's run is given its own (``pipeline.run(monitor=...)``), so it serves none.
    """
    if base.monitoring.prometheus_port is None:
        return {}
    labels = [monitoring.stream_label(job.input) for job in jobs]
    metrics, server = monitoring.serve_metrics(base.monitoring, labels)
    stack.callback(server.close)
    return {job.input: metrics[label] for job, label in zip(jobs, labels, strict=True)}


class _Loading:
    """The streams' one explainer, made in a thread of its own; every call waits until it is.

    In-process, its one model takes the streams' frames in turn (a fair lock); the Ray
    explainer serves the streams' frames first come, first served. The thread that made it
    also closes it, and lives until then: a local Ray instance's processes are started with
    PR_SET_PDEATHSIG, so they are killed when the *thread* that started them ends.
    """

    def __init__(self, make: Callable[[], OwnedExplainer]) -> None:
        self._made: OwnedExplainer | None = None
        self._shared: SharedExplainer | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(
            target=self._hold, args=(make,), daemon=True, name="explainer"
        )
        self._thread.start()

    def _hold(self, make: Callable[[], OwnedExplainer]) -> None:
        """Make the explainer, keep it until :meth:`close`, then close it (this same thread)."""
        try:
            made = self._made = make()
            self._shared = SharedExplainer(made, serialize=isinstance(made, LocalExplainer))
        except BaseException as err:  # raised again to every caller
            self._error = err
            return
        finally:
            self._ready.set()
        self._closing.wait()
        try:
            made.close()
        except Exception:
            log.exception("closing the streams' explainer failed")

    def wait(self) -> SharedExplainer:
        """Return the explainer once made; raise what making it raised."""
        while not self._ready.wait(0.2):  # a timeout: Ctrl-C gets through to the main thread
            pass
        if self._error is not None:
            raise self._error
        assert self._shared is not None
        return self._shared

    @property
    def meta(self) -> ModelMeta:
        """Return the model's preprocessing and class names."""
        return self.wait().meta

    def classify(self, xs: torch.Tensor) -> torch.Tensor:
        """Return logits (N, C) on CPU."""
        return self.wait().classify(xs)

    def explain(
        self, items: Iterable[tuple[P, FrameTask | None]], reuse: ReuseOptions | None = None
    ) -> Iterator[tuple[P, FrameResult | None]]:
        """Yield (payload, result) in the order of ``items`` (one stream)."""
        return self.wait().explain(items, reuse)

    def workers_up(self) -> int:
        """Return how many workers take calls now (0 while they start; never waits)."""
        shared = self._shared if self._ready.is_set() else None
        return 0 if shared is None else shared.workers_up()

    def close(self) -> None:
        """Release the workers (once made: a close during start-up waits for it)."""
        self._closing.set()
        self._thread.join()


class _Streams:
    """One thread per stream; the calling thread collects their records and takes signals."""

    def __init__(
        self,
        configs: list[Config],
        jobs: list[Job],
        explainer: Explainer,
        boards: dict[str, RunMetrics],
        summary: SummaryWriter,
        on_record: Callable[[VideoRecord, BatchProgress], None] | None,
    ) -> None:
        self.configs = configs
        self.jobs = jobs
        self.explainer = explainer
        self.boards = boards
        self.summary = summary
        self.on_record = on_record
        self.stop = threading.Event()
        self.results: queue.Queue[VideoRecord | BaseException] = queue.Queue()

    def run(self, check: Callable[[], object]) -> None:
        """Run every stream to its end; ``check()`` once the explainer is made (may raise)."""
        threads = [
            threading.Thread(target=self._stream, args=(i,), name=f"stream-{i}", daemon=True)
            for i in range(len(self.jobs))
        ]
        for thread in threads:
            thread.start()
        taken = 0
        try:
            check()  # waits for the model: its error (or a bad --target) stops every stream
            for record in arrivals(self.results, len(threads)):
                self._record(record)
                taken += 1
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the normal stop, as for one live run
            left = len(threads) - taken
            log.info("stopping %d live stream(s); their outputs are finished", left)
            self.stop.set()
            for record in arrivals(self.results, left):
                self._record(record)
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=30)

    def _record(self, record: VideoRecord) -> None:
        self.summary.add(record)
        if self.on_record is not None:
            done = len(self.summary.records)
            progress = BatchProgress(done, len(self.jobs), 0, 0.0, None)
            self.on_record(record, progress)

    def _stream(self, index: int) -> None:
        job, config = self.jobs[index], self.configs[index]
        began = time.perf_counter()
        try:
            summary = run(
                config,
                explainer=self.explainer,
                monitor=self.boards.get(job.input),
                stop=self.stop,
            )
        except ScoreCamError as err:
            log.warning("%s failed: %s", job.input, first_line(err))
            seconds = time.perf_counter() - began
            self.results.put(
                VideoRecord(job.input, str(job.output), "failed", seconds=seconds, error=str(err))
            )
            return
        except BaseException as err:  # a bug, or a fault no stream can go on from
            self.results.put(err)
            return
        self.results.put(
            VideoRecord(
                job.input,
                str(job.output),
                "done",
                summary.frames,
                summary.explained,
                summary.seconds,
            )
        )
