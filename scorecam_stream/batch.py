"""Many videos in one run: inputs expanded, outputs named, finished ones skipped, one explainer.

The explainer (the model replica in-process, or the Ray workers and their replicas) is built
once and lent to every video's :func:`~scorecam_stream.pipeline.run`; up to
``max_inflight_videos`` videos run at once, each in a thread of its own, so the workers have
frames to explain while one video's decoder starts or another's encoder finishes. A video that
fails (missing, not a video, broken) is recorded with its one-line reason and the others go on;
an interrupt stops them all, and what each video writes appears only when it is whole (see
:func:`~scorecam_stream.pipeline.run`), so a re-run skips the finished videos and redoes the
rest. No argv here: :mod:`scorecam_stream.cli` builds the :class:`BatchConfig`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from . import video
from .annotate import fixed_target
from .config import BatchConfig, Config
from .errors import ScoreCamError, first_line
from .pipeline import default_output, make_explainer, run
from .workers import Explainer, FrameResult, FrameTask, LocalExplainer

log = logging.getLogger(__name__)

P = TypeVar("P")

# What a directory's videos are: these extensions, case-insensitive.
VIDEO_EXTENSIONS = frozenset(
    {
        ".3gp",
        ".avi",
        ".flv",
        ".m2ts",
        ".m4v",
        ".mkv",
        ".mov",
        ".mp4",
        ".mpeg",
        ".mpg",
        ".mts",
        ".ogv",
        ".ts",
        ".webm",
        ".wmv",
    }
)
OUTPUT_MARK = ".scorecam."  # this tool's outputs: never taken as inputs from a directory or glob
JOIN_TIMEOUT_S = 60.0  # after a stop, how long the videos in progress get to notice it


class BatchStopped(BaseException):
    """Raised inside a video's run when the batch was asked to stop (a BaseException so that
    no ``except Exception`` on the way turns it into a failure of that video)."""


# --- inputs and outputs ----------------------------------------------------------------------


def is_glob(item: str) -> bool:
    """Return whether ``item`` is a glob pattern (``*``, ``?`` or ``[...]``)."""
    return any(c in item for c in "*?[")


def _takeable(path: Path) -> bool:
    """Return whether a file found in a directory or by a glob is an input (not hidden, not
    one of this tool's outputs)."""
    return path.is_file() and not path.name.startswith(".") and OUTPUT_MARK not in path.name


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Return the inputs that ``items`` name, in order, each once.

    A directory gives its video files (by :data:`VIDEO_EXTENSIONS`, not recursive) sorted by
    name; a glob pattern that is not an existing path gives its matching files sorted (``**``
    recursive); a URL, ``-`` or any other path is taken as given (a missing file fails later,
    as that video's failure). Hidden files and this tool's outputs (``*.scorecam.*``) are left
    out of directories and globs. A directory without videos or a pattern without matches is a
    mistake (ScoreCamError).
    """
    found: list[str] = []
    for item in items:
        if item == video.STDIN or video.is_url(item):
            found.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            videos = sorted(
                p for p in path.iterdir() if _takeable(p) and p.suffix.lower() in VIDEO_EXTENSIONS
            )
            if not videos:
                raise ScoreCamError(
                    f"no videos in directory {item} (files ending with "
                    f"{', '.join(sorted(VIDEO_EXTENSIONS))})"
                )
            found += [str(p) for p in videos]
        elif not path.exists() and is_glob(item):
            matches = sorted(m for m in glob.glob(item, recursive=True) if _takeable(Path(m)))
            if not matches:
                raise ScoreCamError(f"no file matches {item}")
            found += matches
        else:
            found.append(item)
    seen: set[str] = set()
    unique = []
    for item in found:
        key = item if item == video.STDIN or video.is_url(item) else os.path.realpath(item)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


@dataclass(frozen=True)
class Job:
    """One video of a batch: its input and the paths it writes (None: not asked for)."""

    input: str
    output: Path
    save_maps: Path | None = None
    jsonl: Path | None = None
    preview: Path | None = None

    def paths(self) -> Iterator[Path]:
        """Yield every path this video writes."""
        for path in (self.output, self.save_maps, self.jsonl, self.preview):
            if path is not None:
                yield path


def plan_jobs(inputs: Sequence[str], batch: BatchConfig) -> list[Job]:
    """Return each input's job, its outputs named after the input's stem.

    ``<stem>.scorecam.mp4`` (``.png`` for an image) in ``batch.output_dir``, or beside the
    input; side outputs ``<stem>.maps.npz``, ``<stem>.jsonl``, ``<stem>.preview.png`` in their
    directories. Two inputs that would write the same file are a mistake (ScoreCamError naming
    both), never a silent overwrite.
    """
    jobs = []
    writers: dict[str, str] = {}  # absolute output path -> the input that writes it
    for item in inputs:
        is_image = Path(item).suffix.lower() in video.IMAGE_CODECS and not video.is_url(item)
        beside = default_output(item, is_image)
        stem = beside.name.split(OUTPUT_MARK)[0]
        out_dir = batch.output_dir
        job = Job(
            input=item,
            output=Path(out_dir) / beside.name if out_dir else beside,
            save_maps=Path(batch.maps_dir) / f"{stem}.maps.npz" if batch.maps_dir else None,
            jsonl=Path(batch.jsonl_dir) / f"{stem}.jsonl" if batch.jsonl_dir else None,
            preview=Path(batch.preview_dir) / f"{stem}.preview.png" if batch.preview_dir else None,
        )
        for path in job.paths():
            key = os.path.abspath(path)
            if key in writers:
                raise ScoreCamError(
                    f"{writers[key]} and {item} would both write {path}; "
                    "rename one or run them separately"
                )
            writers[key] = item
        jobs.append(job)
    return jobs


def check_not_live(inputs: Sequence[str], config: Config) -> None:
    """Raise ScoreCamError if a live input (network stream, ``-``, device) is in a batch."""
    source = config.source
    for item in inputs:
        live = (
            source.live
            if source.live is not None
            else video.is_live_source(item, source.input_format)
        )
        if live:
            raise ScoreCamError(
                f"{item} is read live; a live input needs a run of its own "
                f"(scorecam-video {item} ...), not one of several inputs"
            )


def with_batch_defaults(base: Config, videos: int) -> Config:
    """Return ``base`` with whole frames per Ray worker (``--shards-per-frame 1``) when the
    videos to do are at least as many as the workers and no shard count was given.

    Splitting a frame over the workers lowers one frame's latency, which a batch does not
    need; whole frames save every worker's base forward of every frame and all but one call
    per frame, while enough frames (and videos) are in flight to keep every worker busy.
    """
    dist = base.distributed
    if not dist.distributed or dist.shards_per_frame is not None or videos < dist.num_workers:
        return base
    return dataclasses.replace(base, distributed=dataclasses.replace(dist, shards_per_frame=1))


def config_for(base: Config, job: Job) -> Config:
    """Return the Config of one video of the batch: the shared settings, its input, its paths."""

    def name(path: Path | None) -> str | None:
        return None if path is None else str(path)

    output = dataclasses.replace(
        base.output,
        output=str(job.output),
        save_maps=name(job.save_maps),
        jsonl=name(job.jsonl),
        preview=name(job.preview),
    )
    return dataclasses.replace(base, input=job.input, output=output)


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoRecord:
    """What happened to one video: done, skipped (its output existed) or failed (why)."""

    input: str
    output: str
    status: str  # "done" | "skipped" | "failed"
    frames: int = 0
    explained: int = 0
    seconds: float = 0.0
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """Return the record as the summary file's line."""
        return {**dataclasses.asdict(self), "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class BatchProgress:
    """Where the batch stands: videos finished of those to run, frames, speed, time left."""

    videos_done: int  # finished (done or failed) of videos_total
    videos_total: int  # videos to run (skipped ones not counted)
    frames: int  # frames written so far, videos in progress included
    frames_per_s: float
    eta_s: float | None  # None: not known yet


@dataclass(frozen=True)
class BatchResult:
    """Every video's record, in input order, and the batch's totals."""

    records: tuple[VideoRecord, ...]
    seconds: float  # wall time of the whole batch, model start-up included

    def with_status(self, status: str) -> list[VideoRecord]:
        """Return the records with ``status``."""
        return [r for r in self.records if r.status == status]

    @property
    def frames(self) -> int:
        """Return the frames written by the videos done."""
        return sum(r.frames for r in self.records)


class SummaryWriter:
    """The ``--summary`` JSON lines: one per finished video.

    Each record is appended and flushed to ``<summary>.part`` as its video finishes, so a
    killed run leaves the records of its finished videos there; :meth:`close` (at the end, or
    after an interrupt) writes them all, in input order, to the summary file at once
    (``os.replace``) and removes the part file. The summary is a report of this run: it is
    replaced each run (a resumed run lists the earlier ones as skipped).
    """

    def __init__(self, path: str | None, order: Sequence[str]) -> None:
        self.path = Path(path) if path else None
        self._order = {item: i for i, item in enumerate(order)}
        self._records: list[VideoRecord] = []
        self._part = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._part_path = self.path.with_name(self.path.name + ".part")
            self._part = self._part_path.open("w", encoding="utf-8")

    @property
    def records(self) -> list[VideoRecord]:
        """Return the records so far, in the order they came."""
        return list(self._records)

    def add(self, record: VideoRecord) -> None:
        """Keep ``record``; append it to the part file now."""
        self._records.append(record)
        if self._part is not None:
            self._part.write(json.dumps(record.as_json()) + "\n")
            self._part.flush()

    def close(self) -> None:
        """Write the summary file whole, from the records so far."""
        if self._part is None or self.path is None:
            return
        self._part.close()
        self._part = None
        records = sorted(self._records, key=lambda r: self._order.get(r.input, len(self._order)))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r.as_json()) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, self.path)
        self._part_path.unlink(missing_ok=True)


# --- the shared explainer --------------------------------------------------------------------


class SharedExplainer:
    """The batch's one explainer, lent to each video's run: its :meth:`close` does nothing.

    ``serialize``: one call at a time, frame by frame, for an explainer whose worker is not
    thread-safe (the in-process :class:`~scorecam_stream.workers.LocalExplainer`); videos then
    take turns frame by frame, and their decoding and encoding still overlap. The Ray
    explainer serves concurrent runs itself (one ``explain`` per thread, the same workers).
    """

    def __init__(self, explainer: Explainer, serialize: bool) -> None:
        self.inner = explainer
        self.meta = explainer.meta
        self._lock = threading.Lock() if serialize else None

    def classify(self, xs: torch.Tensor) -> torch.Tensor:
        """Return logits (N, C) on CPU."""
        if self._lock is None:
            return self.inner.classify(xs)
        with self._lock:
            return self.inner.classify(xs)

    def explain(
        self, items: Iterable[tuple[P, FrameTask | None]]
    ) -> Iterator[tuple[P, FrameResult | None]]:
        """Yield (payload, result) in the order of ``items``."""
        if self._lock is None:
            yield from self.inner.explain(items)
            return
        for payload, task in items:
            if task is None:
                yield payload, None
                continue
            with self._lock:  # the frame is decoded outside the lock, explained inside it
                _, result = next(iter(self.inner.explain([(payload, task)])))
            yield payload, result

    def close(self) -> None:
        """Leave the explainer open for the next video (the batch closes it at the end)."""


# --- the run ---------------------------------------------------------------------------------


class _Tally:
    """Frames done per video in progress and per finished video, for speed and time left."""

    def __init__(self, total_videos: int, began: float) -> None:
        self.total_videos = total_videos
        self.began = began
        self.finished_videos = 0
        self.finished_frames = 0
        self.done_videos = 0  # finished and succeeded: their frames give the mean length
        self.done_frames = 0
        self.running: dict[int, tuple[int, int | None]] = {}  # job -> (frames done, expected)

    def snapshot(self) -> BatchProgress:
        frames = self.finished_frames + sum(done for done, _ in self.running.values())
        elapsed = time.perf_counter() - self.began
        rate = frames / elapsed if elapsed > 0 else 0.0
        known = [t for _, t in self.running.values() if t] + (
            [self.done_frames / self.done_videos] if self.done_videos else []
        )
        eta = None
        if rate > 0 and known:
            mean = (
                self.done_frames / self.done_videos if self.done_videos else sum(known) / len(known)
            )
            left = sum(max(0.0, (t or mean) - done) for done, t in self.running.values())
            unstarted = self.total_videos - self.finished_videos - len(self.running)
            eta = (left + max(0, unstarted) * mean) / rate
        return BatchProgress(self.finished_videos, self.total_videos, frames, rate, eta)


def run_batch(
    base: Config,
    batch: BatchConfig,
    on_progress: Callable[[BatchProgress], None] | None = None,
    on_record: Callable[[VideoRecord, BatchProgress], None] | None = None,
    explainer_factory: Callable[[Config], Explainer] = make_explainer,
) -> BatchResult:
    """Explain every input of ``batch`` with the settings of ``base``; return every record.

    Inputs whose video output exists are skipped unless ``--overwrite``. The explainer is built
    once (only if a video is left to do) and closed at the end. A video's ScoreCamError is its
    record's reason; mistakes that stop everything (no inputs, two inputs writing one file, a
    live input, an unknown target, workers that do not start) raise ScoreCamError; an interrupt
    (KeyboardInterrupt, SIGTERM's Terminated) stops the videos in progress, which write
    nothing, and propagates after the summary is written. ``on_progress`` is called from the
    videos' threads, one call at a time; ``on_record`` from the calling thread.
    """
    began = time.perf_counter()
    inputs = expand_inputs(batch.inputs)
    check_not_live(inputs, base)
    jobs = plan_jobs(inputs, batch)
    overwrite = base.output.overwrite
    todo = [job for job in jobs if overwrite or not job.output.exists()]
    base = with_batch_defaults(base, len(todo))
    # Start the workers before writing anything: a fault there stops the batch with no trace.
    explainer = explainer_factory(base) if todo else None
    try:
        if explainer is not None:
            fixed_target(base.explain.target, explainer.meta.class_names)  # a bad name stops all
        for directory in (batch.output_dir, batch.maps_dir, batch.jsonl_dir, batch.preview_dir):
            if directory:
                Path(directory).mkdir(parents=True, exist_ok=True)
        summary = SummaryWriter(batch.summary, inputs)
        try:
            running = set(todo)
            for job in jobs:
                if job not in running:
                    summary.add(VideoRecord(job.input, str(job.output), "skipped"))
            if explainer is not None:
                shared = SharedExplainer(explainer, serialize=isinstance(explainer, LocalExplainer))
                threads = min(len(todo), batch.inflight_videos(base.distributed.distributed))
                log.info("%d videos to do, %d at a time", len(todo), threads)
                _Pool(base, todo, shared, threads, summary, on_progress, on_record).run()
        finally:
            summary.close()
    finally:
        if explainer is not None:
            explainer.close()
    order = {job.input: i for i, job in enumerate(jobs)}
    records = sorted(summary.records, key=lambda r: order[r.input])
    return BatchResult(tuple(records), time.perf_counter() - began)


class _Pool:
    """Threads that take the next video and run it; the calling thread collects the records."""

    def __init__(
        self,
        base: Config,
        jobs: list[Job],
        explainer: SharedExplainer,
        threads: int,
        summary: SummaryWriter,
        on_progress: Callable[[BatchProgress], None] | None,
        on_record: Callable[[VideoRecord, BatchProgress], None] | None,
    ) -> None:
        self.base = base
        self.jobs = jobs
        self.explainer = explainer
        self.threads = threads
        self.summary = summary
        self.on_progress = on_progress
        self.on_record = on_record
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.tally = _Tally(len(jobs), time.perf_counter())
        self.next_job = 0
        self.recorded = 0  # records handed to on_record
        # A finished video's record, or the unexpected exception that stops the batch.
        self.results: queue.Queue[VideoRecord | BaseException] = queue.Queue()

    def run(self) -> None:
        workers = [
            threading.Thread(target=self._work, name=f"batch-video-{i}", daemon=True)
            for i in range(self.threads)
        ]
        for worker in workers:
            worker.start()
        left = len(self.jobs)
        try:
            while left:
                try:
                    # A timeout, so that Ctrl-C and SIGTERM (main thread only) get through.
                    item = self.results.get(timeout=0.2)
                except queue.Empty:
                    continue
                if isinstance(item, BaseException):
                    raise item
                self._record(item)
                left -= 1
        finally:
            self.stop.set()
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            for worker in workers:
                worker.join(timeout=max(0.0, deadline - time.monotonic()))
            # Videos that finished while the others were stopping are kept, and said so.
            while True:
                try:
                    item = self.results.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, VideoRecord):
                    self._record(item)
            stuck = [w.name for w in workers if w.is_alive()]
            if stuck:
                log.warning("%d video(s) still stopping after %g s", len(stuck), JOIN_TIMEOUT_S)

    def _record(self, record: VideoRecord) -> None:
        self.summary.add(record)
        self.recorded += 1
        if self.on_record is not None:
            with self.lock:
                progress = self.tally.snapshot()
            # Videos said so far (others may have finished and wait in the queue).
            self.on_record(record, dataclasses.replace(progress, videos_done=self.recorded))

    def _take(self) -> tuple[int, Job] | None:
        with self.lock:
            if self.stop.is_set() or self.next_job >= len(self.jobs):
                return None
            index = self.next_job
            self.next_job += 1
            self.tally.running[index] = (0, None)
            return index, self.jobs[index]

    def _work(self) -> None:
        while (taken := self._take()) is not None:
            index, job = taken
            try:
                record = self._run_one(index, job)
            except BatchStopped:
                return
            except BaseException as err:  # a bug, or a fault no video can go on from
                self.stop.set()
                self.results.put(err)
                return
            self.results.put(record)

    def _run_one(self, index: int, job: Job) -> VideoRecord:
        def progress(done: int, total: int | None) -> None:
            if self.stop.is_set():
                raise BatchStopped
            with self.lock:
                self.tally.running[index] = (done, total)
                if self.on_progress is not None:
                    self.on_progress(self.tally.snapshot())

        began = time.perf_counter()
        frames = explained = 0
        try:
            result = run(
                config_for(self.base, job),
                progress=progress,
                explainer_factory=lambda _config: self.explainer,
            )
            frames, explained = result.frames, result.explained
            record = VideoRecord(
                job.input, str(job.output), "done", frames, explained, result.seconds
            )
        except ScoreCamError as err:
            log.debug("%s failed: %s", job.input, err)
            record = VideoRecord(
                job.input,
                str(job.output),
                "failed",
                seconds=time.perf_counter() - began,
                error=first_line(err),
            )
        with self.lock:
            self.tally.running.pop(index, None)
            self.tally.finished_videos += 1
            self.tally.finished_frames += frames
            if record.status == "done":
                self.tally.done_videos += 1
                self.tally.done_frames += frames
        return record
