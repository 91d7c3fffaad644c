"""The run of a batch: one explainer lent to every video, videos in threads or Ray tasks."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..config import Config
from ..config_batch import BatchConfig
from ..errors import ScoreCamError, first_line
from ..pipeline import make_explainer, run
from ..targets import parse as parse_target
from ..video import check_encoder
from ..workers import Explainer, LocalExplainer, OwnedExplainer
from .jobs import (
    Job,
    absolute_job,
    all_live,
    config_for,
    expand_inputs,
    make_output_dirs,
    plan_jobs,
    with_batch_defaults,
)
from .records import BatchProgress, BatchResult, SummaryWriter, Tally, VideoRecord
from .shared import SharedExplainer, arrivals
from .streams import run_streams

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 60.0  # after a stop, how long the videos in progress get to notice it


class BatchStopped(BaseException):
    """Raised inside a video's run when the batch was asked to stop (a BaseException so that
    no ``except Exception`` on the way turns it into a failure of that video)."""


P = TypeVar("P")


def run_batch(
    base: Config,
    batch: BatchConfig,
    on_progress: Callable[[BatchProgress], None] | None = None,
    on_record: Callable[[VideoRecord, BatchProgress], None] | None = None,
    explainer_factory: Callable[[Config], OwnedExplainer] = make_explainer,
) -> BatchResult:
    """Explain every input of ``batch`` with the settings of ``base``; return every record.

    Inputs whose video output exists are skipped unless ``--overwrite``. The explainer is built
    once (only if a video is left to do) and closed at the end. A video's ScoreCamError is its
    record's reason; mistakes that stop everything (no inputs, two inputs writing one file, live
    and file inputs mixed, an unknown target, workers that do not start) raise ScoreCamError.
    Live inputs run together as streams (:func:`~.streams.run_streams`). An interrupt
    (KeyboardInterrupt, SIGTERM's Terminated) stops the videos in progress, which write
    nothing, and propagates after the summary is written. ``on_progress`` is called from the
    videos' threads, one call at a time; ``on_record`` from the calling thread.
    """
    began = time.perf_counter()
    inputs = expand_inputs(batch.inputs)
    check_encoder(base.output.encoder)  # before any model loads or worker starts
    if all_live(inputs, base):
        return run_streams(base, batch, inputs, explainer_factory, on_record)
    if batch.names:
        raise ScoreCamError("--name names live streams; these inputs are files")
    jobs = plan_jobs(inputs, batch)
    overwrite = base.output.overwrite
    todo = [job for job in jobs if overwrite or not job.output.exists()]
    base = with_batch_defaults(base, len(todo))
    # Start the workers before writing anything: a fault there stops the batch with no trace.
    explainer = explainer_factory(base) if todo else None
    try:
        if explainer is not None:
            parse_target(base.explain.target, explainer.meta.class_names)  # a bad name stops all
        make_output_dirs(batch)
        summary = SummaryWriter(batch.summary, inputs)
        try:
            running = set(todo)
            for job in jobs:
                if job not in running:
                    summary.add(VideoRecord(job.input, str(job.output), "skipped"))
            if explainer is not None:
                threads = min(len(todo), batch.inflight_videos(base.distributed.uses_ray))
                log.info("%d videos to do, %d at a time", len(todo), threads)
                if batch.video_tasks:
                    _run_as_tasks(base, todo, explainer, threads, summary, on_record)
                else:
                    serialize = isinstance(explainer, LocalExplainer)
                    shared = SharedExplainer(explainer, serialize)
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
        self.tally = Tally(len(jobs), time.perf_counter())
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
        try:
            for record in arrivals(self.results, len(self.jobs)):
                self._record(record)
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

        record = run_job(self.base, job, self.explainer, progress)
        with self.lock:
            self.tally.running.pop(index, None)
            self.tally.finished(record)
        return record


def run_job(
    base: Config,
    job: Job,
    explainer: Explainer,
    progress: Callable[[int, int | None], None] | None = None,
) -> VideoRecord:
    """Run one video of the batch with the lent ``explainer``; return its record.

    A ScoreCamError (missing, not a video, broken) is the record's reason; anything else
    propagates.
    """
    began = time.perf_counter()
    try:
        result = run(config_for(base, job), progress=progress, explainer=explainer)
    except ScoreCamError as err:
        log.debug("%s failed: %s", job.input, err)
        seconds = time.perf_counter() - began
        return VideoRecord(
            job.input, str(job.output), "failed", seconds=seconds, error=first_line(err)
        )
    return VideoRecord(
        job.input, str(job.output), "done", result.frames, result.explained, result.seconds
    )


def run_video_task(base: Config, portable: Any, job: Job) -> VideoRecord:
    """Run one video inside a Ray task (``--video-tasks``): its decode, render and encode on
    that task's node, its frames explained by the driver's workers (``portable``)."""
    return run_job(base, job, portable.open())


def _run_as_tasks(
    base: Config,
    jobs: list[Job],
    explainer: Explainer,
    inflight: int,
    summary: SummaryWriter,
    on_record: Callable[[VideoRecord, BatchProgress], None] | None,
) -> None:
    """Run each video as a Ray task on any node (``--video-tasks``), ``inflight`` at once.

    A task that fails, or is lost with its node, is that video's failure. Ctrl-C cancels the
    tasks still running; their outputs, unnamed until whole, vanish with them.
    """
    from ..distributed.tasks import run_tasks  # Ray only for a Ray batch

    portable = getattr(explainer, "portable", None)
    if portable is None:
        raise ScoreCamError("--video-tasks needs Ray workers (--workers, --gpus or --address)")
    tally = Tally(len(jobs), time.perf_counter())
    # A task's working directory is not the driver's: it gets absolute paths.
    absolute = [absolute_job(job) for job in jobs]
    outcomes = run_tasks(run_video_task, absolute, inflight, shared=(base, portable()))
    for done, (index, record, error) in enumerate(outcomes, 1):
        job = jobs[index]
        if error is not None:
            record = VideoRecord(job.input, str(job.output), "failed", error=first_line(error))
        record = dataclasses.replace(record, input=job.input, output=str(job.output))
        tally.finished(record)
        summary.add(record)
        if on_record is not None:
            on_record(record, dataclasses.replace(tally.snapshot(), videos_done=done))
