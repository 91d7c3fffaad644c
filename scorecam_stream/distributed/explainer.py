"""The distributed explainer: frames in, per-frame results out, each frame's passes split.

:class:`ShardedExplainer` gives the pipeline what
:class:`~scorecam_stream.workers.LocalExplainer` gives it (per-frame results in input order) with
the masked passes of every frame split into channel shards over a pool of workers; it knows the
frame protocol, not Ray, so its faults are tested with a fake pool (``tests/test_explainer.py``).
:class:`~scorecam_stream.distributed.cluster.RayExplainer` is the same over Ray actors.

Per frame: one worker classifies it (its base pass is cached there) and resolves its targets
once; the channel range is split by :func:`~scorecam_stream.scheduler.balanced_ranges` into
shards of equal work (constant channels cost no pass); every shard goes to whichever worker has
room (the classifying worker gets the first, its base pass is ready); the partials are summed
in shard order; with ``--metrics`` the frame's metric passes are one more call. Several frames
are in flight, within a bound, so no worker idles between frames and memory stays flat. Each
call is an object of :mod:`.calls` that knows what it sends and what its reply does; this module
queues the calls, sends them to free workers and hands the replies back.

Several runs (``explain`` calls, e.g. one per video) may go on at once from different threads:
they share the workers, the oldest run's calls first (a batch: each video is done soonest in
turn), or with ``fair`` every run's frames in the order they came (live streams: one frame in
flight each, they take turns and none starves). One thread at a time waits on the pool and
handles every run's replies; the others wait for it.

Faults, one policy (:class:`~scorecam_stream.scheduler.RetryPolicy`): a call whose worker died
goes to another worker; one that raised is sent again ``max_shard_retries`` times, then the run
fails with one line naming the frame and the shard; a user mistake raised by a worker (a target
class the model does not have) is not retried.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ScoreCamError
from ..models import ModelMeta
from ..records import FrameResult, FrameTask
from ..reuse import ReuseOptions, StreamState
from ..scheduler.health import RetryPolicy, SlotState
from ..scheduler.inflight import InflightTracker
from ..scheduler.planning import max_held_items
from ..weighting import Weighting
from ..workers import P
from .calls import Call, Classify, ClassifyFrames, Context, Pool, Run, View

log = logging.getLogger(__name__)

_WAIT_S = 1.0  # longest single wait on the pool, so that deadlines are checked


@dataclass
class DispatchStats:
    """Counts of one explainer's worker calls (for logs and tests)."""

    calls: int = 0  # calls sent, every resend included
    retried: int = 0  # calls sent again after an exception inside the worker
    resubmitted: int = 0  # calls sent again after their worker died


class CallQueue:
    """The calls waiting for a worker: oldest run, frame and shard first; with ``fair``, the
    frames of every run in the order they were admitted, then shard order.

    A call with a preferred worker (a frame's first shard, whose base pass is cached there) is
    offered to that worker first, and to any other once it is busy or down.
    """

    def __init__(self, fair: bool = False) -> None:
        self.fair = fair
        self._pending: list[tuple[int, int, int, int, Call]] = []  # heap by rank, then age
        self._preferred: list[Call] = []
        self._age = itertools.count()  # the tie-breaker of the heap

    def push(self, call: Call) -> None:
        """Queue ``call``."""
        if call.prefer is not None:
            self._preferred.append(call)
            return
        heapq.heappush(self._pending, (*call.rank(self.fair), next(self._age), call))

    def drop(self, run: Run) -> None:
        """Forget the calls of ``run``."""
        self._pending = [entry for entry in self._pending if entry[-1].run is not run]
        heapq.heapify(self._pending)
        self._preferred = [call for call in self._preferred if call.run is not run]

    def send(self, pool: Pool, context: Context) -> int:
        """Send queued calls to the workers that have room; return how many were sent."""
        sent = 0
        preferred, self._preferred = self._preferred, []
        for call in preferred:
            prefer, call.prefer = call.prefer, None
            slot = pool.free(prefer)
            if slot is not None and slot is prefer:
                call.send(pool, slot, context)
                sent += 1
            else:  # its worker is busy or down: any worker will do
                self.push(call)
        while self._pending:
            slot = pool.free()
            if slot is None:
                break
            heapq.heappop(self._pending)[-1].send(pool, slot, context)
            sent += 1
        return sent


class ShardedExplainer:
    """Explains frames over a worker ``pool``, each frame's channels split into shards.

    ``meta`` is the model's preprocessing and class names, as the workers loaded it;
    ``scoring``: each frame's faithfulness metrics are computed too (the workers were started
    with metrics); ``fair``: concurrent runs are served frame by frame in the order their
    frames came, not the oldest run first (see the module docstring).
    """

    def __init__(
        self,
        pool: Pool,
        meta: ModelMeta,
        *,
        topk: int = 1,
        shards_per_frame: int,
        max_inflight: int,
        policy: RetryPolicy,
        scoring: bool = False,
        weighting: Weighting | None = None,
        fair: bool = False,
    ) -> None:
        if topk < 1:
            raise ScoreCamError(f"--topk must be >= 1, got {topk}")
        self.pool = pool
        self.meta = meta
        self.topk = topk
        self.shards_per_frame = shards_per_frame
        self.max_inflight = max_inflight
        self.policy = policy
        self.scoring = scoring
        self.fair = fair
        self.weighting = weighting or Weighting()  # how a reusing run's maps are summed
        self.stats = DispatchStats()
        self._closed = False
        self._cond = threading.Condition()
        self._runs: list[Run] = []
        self._queue = CallQueue(fair)
        self._context = Context(topk, shards_per_frame, scoring, self._queue.push)
        self._polling = False  # a thread is waiting on the pool for everyone
        # The workers' cache keys: unique across explainers, since explainers in other
        # processes (Ray tasks, see cluster.PortableExplainer) may share these workers.
        self._keys = zip(itertools.repeat(uuid.uuid4().hex), itertools.count())
        self._clock = itertools.count()  # turns: runs as they begin, frames as they come

    # ------------------------------------------------------------------ public API

    def __enter__(self) -> ShardedExplainer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def classify(self, xs: torch.Tensor) -> torch.Tensor:
        """Return the logits (N, C) on CPU of model inputs ``xs`` (N, 3, S, S), on one worker."""
        run = self._open_run(1)
        call = ClassifyFrames(run, xs)
        try:
            with self._cond:
                self._queue.push(call)
            while True:
                with self._cond:
                    self._step(run)
                    if call.logits is not None:
                        return call.logits
                self._wait()
        finally:
            self._close_run(run)

    def explain(
        self, items: Iterable[tuple[P, FrameTask | None]], reuse: ReuseOptions | None = None
    ) -> Iterator[tuple[P, FrameResult | None]]:
        """Yield (payload, result) in the order of ``items``; a None task passes through.

        Items are pulled lazily, only while fewer than ``max_inflight`` frames are in flight.
        ``reuse`` below fidelity 1: the run (a stream) keeps its reuse state here, on the
        driver, and its workers get only the channels to recompute; one frame at a time, since
        each plan needs the cache as the previous frame left it (its passes still spread over
        the workers).
        """
        exact = reuse is None or reuse.exact
        run = self._open_run(self.max_inflight if exact else 1)
        run.state = None if reuse is None or exact else StreamState(self.weighting, reuse)
        inputs = iter(items)
        exhausted = False
        frames = 0
        began = time.perf_counter()
        try:
            while True:
                if not exhausted:
                    exhausted = self._admit(run, inputs)
                with self._cond:
                    self._step(run)
                    seq = run.buffer.next_index
                    out = run.buffer.pop()
                    if out is not None and out[1] is not None:
                        run.tracker.release(seq)
                    finished = out is None and exhausted and not len(run.tracker)
                if out is not None:
                    frames += out[1] is not None
                    yield out
                    continue
                if finished:
                    break
                self._wait()
            log.info(
                "explained %d frames in %.1f s (%s)",
                frames,
                time.perf_counter() - began,
                self.stats,
            )
        finally:
            self._close_run(run)

    def workers_up(self) -> int:
        """Return how many workers of the pool take calls now (not dead nor restarting)."""
        return sum(slot.state is SlotState.UP for slot in list(self.pool.slots))

    def close(self) -> None:
        """Stop taking calls. Idempotent; subclasses release their workers."""
        self._closed = True

    # ------------------------------------------------------------------ runs

    def _open_run(self, max_inflight: int) -> Run:
        if self._closed:
            raise RuntimeError("the explainer is closed")
        tracker = InflightTracker[Any](max_inflight)
        with self._cond:  # its turn on the clock that frames take theirs from
            run = Run(next(self._clock), tracker, max_held_items(max_inflight))
            self._runs.append(run)
        return run

    def _close_run(self, run: Run) -> None:
        """Forget a run (finished, failed or abandoned): its queued calls are dropped."""
        with self._cond:
            run.closed = True
            self._runs.remove(run)
            self._queue.drop(run)
            self._cond.notify_all()

    def _step(self, run: Run) -> None:
        """Raise the run's error if it has one; send what can be sent. Holds the lock."""
        if run.error is not None:
            raise run.error
        self._dispatch()

    def _admit(self, run: Run, inputs: Iterator[tuple[Any, FrameTask | None]]) -> bool:
        """Pull items while the run has room; return whether its input is exhausted."""
        first = Classify if run.state is None else View  # a reusing run asks for views
        while True:
            with self._cond:
                room = not run.tracker.full and run.next_seq - run.buffer.next_index < run.max_held
            if not room:
                return False
            try:  # outside the lock: decoding the next frame may take a while
                payload, task = next(inputs)
            except StopIteration:
                return True
            ref = None if task is None else self.pool.put(task.x)
            with self._cond:
                seq = run.next_seq
                run.next_seq += 1
                if task is None:
                    run.buffer.push(seq, (payload, None))
                    continue
                turn, key = next(self._clock), next(self._keys)
                frame = run.tracker.admit(
                    seq, turn=turn, key=key, payload=payload, task=task, ref=ref
                )
                self._queue.push(first(run, frame))

    def _wait(self) -> None:
        """Wait for replies (or for the thread that waits on the pool) and handle them."""
        with self._cond:
            if self._polling:  # another run's thread waits on the pool for everyone
                self._cond.wait(_WAIT_S)
                return
            self._polling = True
        replies: list[Any] = []
        lost: ScoreCamError | None = None
        try:
            replies = self.pool.poll(_WAIT_S)
        except ScoreCamError as err:  # no worker left: every run fails with it
            lost = err
        finally:
            with self._cond:
                self._polling = False
                for run in self._runs:
                    if lost is not None and run.error is None:
                        run.error = lost
                for reply in replies:
                    self._handle(reply)
                self._dispatch()
                self._cond.notify_all()

    # ------------------------------------------------------------------ calls (lock held)

    def _dispatch(self) -> None:
        """Send queued calls, in the queue's order, to the workers that have room."""
        self.stats.calls += self._queue.send(self.pool, self._context)

    def _handle(self, reply: Any) -> None:
        call: Call = reply.tag
        run = call.run
        if run.closed or run.error is not None:
            return  # abandoned: collected only, so that the worker's room comes free
        if reply.failure is None:
            call.answered(reply.value, reply.slot, self._context)
            return
        # The one retry policy: send the call again, or fail its run.
        run.error = call.failed(reply.failure, self.policy)
        if run.error is not None:
            return
        if reply.failure.lost:
            self.stats.resubmitted += 1
        else:
            self.stats.retried += 1
        self._queue.push(call)
