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
are in flight, within a bound, so no worker idles between frames and memory stays flat.

Several runs (``explain`` calls, e.g. one per video) may go on at once from different threads:
they share the workers, the oldest run's calls first. One thread at a time waits on the pool
and handles every run's replies; the others wait for it.

Faults, one policy (:class:`~scorecam_stream.scheduler.RetryPolicy`): a call whose worker died
goes to another worker; one that raised is sent again ``max_shard_retries`` times, then the run
fails with one line naming the frame and the shard; a user mistake raised by a worker (a target
class the model does not have) is not retried.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch

from ..errors import ScoreCamError
from ..evaluation import FrameScores
from ..reuse import ReuseOptions, StreamState
from ..scheduler import (
    FrameState,
    InflightTracker,
    ReorderBuffer,
    RetryPolicy,
    Slot,
    SlotState,
    balanced_ranges,
    max_held_items,
)
from ..scorecam import ShardResult, Weighting, combine_shards
from ..workers import FrameResult, FrameTask, ModelMeta, P, make_result

log = logging.getLogger(__name__)

_WAIT_S = 1.0  # longest single wait on the pool, so that deadlines are checked


class Pool(Protocol):
    """What the explainer needs of a worker pool (:class:`ActorPool`, or a fake in tests)."""

    slots: list[Slot]

    def put(self, value: Any) -> Any:
        """Return a reference to ``value`` that every call may take (stored once)."""
        ...

    def free(self, prefer: Slot | None = None) -> Slot | None:
        """Return a worker with room for a call (``prefer`` if it has), or None."""
        ...

    def submit(self, slot: Slot, tag: Any, method: str, *args: Any) -> None:
        """Send ``method(*args)`` to ``slot``; :meth:`poll` returns it with ``tag``."""
        ...

    def poll(self, timeout: float) -> list[Any]:
        """Return the replies (``tag``, ``slot``, ``value``, ``failure``) that came back."""
        ...


@dataclass
class DispatchStats:
    """Counts of one explainer's worker calls (for logs and tests)."""

    calls: int = 0  # calls sent, every resend included
    retried: int = 0  # calls sent again after an exception inside the worker
    resubmitted: int = 0  # calls sent again after their worker died


class Kind(enum.Enum):
    """What a call computes."""

    CLASSIFY = "classification"  # a frame's base pass, targets and work per channel
    SHARD = "shard"  # a channel range of a frame
    SCORE = "metrics"  # a frame's faithfulness metrics (--metrics)
    BATCH = "batch classification"  # logits of a batch of model inputs (no frame)


@dataclass(eq=False)
class _Run:
    """One ``explain`` (or ``classify``) call: its frames, output order and queued calls."""

    order: int  # runs that began earlier come first
    tracker: InflightTracker[ShardResult]
    max_held: int
    buffer: ReorderBuffer[tuple[Any, FrameResult | None]] = field(default_factory=ReorderBuffer)
    next_seq: int = 0
    closed: bool = False  # abandoned or finished: its calls still in flight are only collected
    error: BaseException | None = None  # raised in the run's own thread at its next step
    value: Any = None  # BATCH: the logits
    done: bool = False  # BATCH: the value arrived
    state: StreamState | None = None  # --fidelity below 1: the stream's reuse state


@dataclass(eq=False)
class _Call:
    """One worker call of a run; ``frame`` is None for a batch classification."""

    run: _Run
    kind: Kind
    frame: FrameState[ShardResult] | None = None
    shard: int = 0
    start: int = 0
    stop: int = 0
    prefer: Slot | None = None
    args: tuple[Any, ...] = ()  # BATCH: (model inputs,)
    failures: int = 0  # exceptions raised inside the worker
    losses: int = 0  # times its worker died under it

    def describe(self) -> str:
        if self.frame is None:
            return f"{self.kind.value} of {len(self.args[0])} frames"
        where = f"shard [{self.start}, {self.stop})" if self.kind is Kind.SHARD else self.kind.value
        return f"frame {self.frame.task.index}: {where}"


class ShardedExplainer:
    """Explains frames over a worker ``pool``, each frame's channels split into shards.

    ``meta`` is the model's preprocessing and class names, as the workers loaded it;
    ``scoring``: each frame's faithfulness metrics are computed too (the workers were started
    with metrics).
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
        self.weighting = weighting or Weighting()  # how a reusing run's maps are summed
        self.stats = DispatchStats()
        self._closed = False
        self._cond = threading.Condition()
        self._runs: list[_Run] = []
        self._pending: list[tuple[int, int, int, int, _Call]] = []  # heap, oldest run first
        self._preferred: list[_Call] = []
        self._polling = False  # a thread is waiting on the pool for everyone
        # The workers' cache keys: unique across explainers, since explainers in other
        # processes (Ray tasks, see cluster.PortableExplainer) may share these workers.
        self._keys = zip(itertools.repeat(uuid.uuid4().hex), itertools.count())
        self._order = itertools.count()  # runs, and the tie-breaker of the heap

    # ------------------------------------------------------------------ public API

    def __enter__(self) -> ShardedExplainer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def classify(self, xs: torch.Tensor) -> torch.Tensor:
        """Return the logits (N, C) on CPU of model inputs ``xs`` (N, 3, S, S), on one worker."""
        run = self._open_run(1)
        try:
            with self._cond:
                self._queue(_Call(run, Kind.BATCH, args=(xs,)))
            while True:
                with self._cond:
                    self._step(run)
                    if run.done:
                        return run.value
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

    def _open_run(self, max_inflight: int) -> _Run:
        if self._closed:
            raise RuntimeError("the explainer is closed")
        run = _Run(next(self._order), InflightTracker(max_inflight), max_held_items(max_inflight))
        with self._cond:
            self._runs.append(run)
        return run

    def _close_run(self, run: _Run) -> None:
        """Forget a run (finished, failed or abandoned): its queued calls are dropped."""
        with self._cond:
            run.closed = True
            self._runs.remove(run)
            self._pending = [entry for entry in self._pending if entry[-1].run is not run]
            heapq.heapify(self._pending)
            self._preferred = [c for c in self._preferred if c.run is not run]
            self._cond.notify_all()

    def _step(self, run: _Run) -> None:
        """Raise the run's error if it has one; send what can be sent. Holds the lock."""
        if run.error is not None:
            raise run.error
        self._dispatch()

    def _admit(self, run: _Run, inputs: Iterator[tuple[Any, FrameTask | None]]) -> bool:
        """Pull items while the run has room; return whether its input is exhausted."""
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
                frame = run.tracker.admit(
                    seq, key=next(self._keys), payload=payload, task=task, ref=ref
                )
                self._queue(_Call(run, Kind.CLASSIFY, frame))

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

    # ------------------------------------------------------------------ dispatch (lock held)

    def _queue(self, call: _Call) -> None:
        if call.prefer is not None:
            self._preferred.append(call)
            return
        seq = -1 if call.frame is None else call.frame.seq
        entry = (call.run.order, seq, call.shard, next(self._order), call)
        heapq.heappush(self._pending, entry)

    def _dispatch(self) -> None:
        """Send queued calls, oldest run and frame first, to the workers that have room."""
        preferred, self._preferred = self._preferred, []
        for call in preferred:
            prefer, call.prefer = call.prefer, None
            slot = self.pool.free(prefer)
            if slot is prefer:
                self._send(call, cast(Slot, slot))  # a preferred call has a worker
            else:  # its worker is busy or down: any worker will do
                self._queue(call)
        while self._pending:
            slot = self.pool.free()
            if slot is None:
                return
            self._send(heapq.heappop(self._pending)[-1], slot)

    def _send(self, call: _Call, slot: Slot) -> None:
        frame = call.frame
        if frame is None:
            self.pool.submit(slot, call, "classify_batch", *call.args)
        elif call.kind is Kind.CLASSIFY:
            method = "targets_and_passes" if call.run.state is None else "view"
            task = frame.task
            self.pool.submit(slot, call, method, frame.key, frame.ref, task.targets, self.topk)
        elif call.kind is Kind.SHARD and frame.reuse is not None:
            channels = frame.reuse[1].channels[call.start : call.stop]
            self.pool.submit(slot, call, "channel_logits", frame.key, frame.ref, channels)
        elif call.kind is Kind.SHARD:
            args = (frame.key, frame.ref, frame.targets, call.start, call.stop)
            self.pool.submit(slot, call, "shard", *args)
        else:
            result = frame.result
            target = int(result.targets[0])
            self.pool.submit(slot, call, "score", frame.ref, result.maps[0], target)
        if frame is not None and frame.began is None:
            frame.began = time.perf_counter()
        self.stats.calls += 1

    # ------------------------------------------------------------------ replies (lock held)

    def _handle(self, reply: Any) -> None:
        call: _Call = reply.tag
        run = call.run
        if run.closed or run.error is not None:
            return  # abandoned: collected only, so that the worker's room comes free
        if reply.failure is not None:
            self._failed(call, reply.failure)
            return
        frame = call.frame
        if frame is None:
            run.value, run.done = reply.value, True
        elif call.kind is Kind.CLASSIFY:
            self._classified(call, reply.slot, reply.value)
        elif call.kind is Kind.SHARD:
            if run.tracker.done(frame.seq, call.shard, reply.value):
                self._frame_done(run, frame)
        else:
            self._scored(run, frame, reply.value)

    def _failed(self, call: _Call, failure: Any) -> None:
        """Send the call again, or fail its run: the one retry policy."""
        if failure.lost:
            call.losses += 1
        else:
            call.failures += 1
        if self.policy.retry(call.failures, call.losses, failure):
            if failure.lost:
                self.stats.resubmitted += 1
            else:
                self.stats.retried += 1
                log.warning(
                    "%s failed (%s); retry %d of %d",
                    call.describe(),
                    failure.cause,
                    call.failures,
                    self.policy.max_failures,
                )
            self._queue(call)
            return
        if not failure.retryable:  # a user mistake: its message says what to change
            message = failure.cause
        elif failure.lost:
            message = f"{call.describe()} failed: its worker died {call.losses} times "
            message += f"({failure.cause})"
        else:
            message = f"{call.describe()} failed: {failure.cause}"
        call.run.error = ScoreCamError(message)

    def _classified(self, call: _Call, slot: Slot, value: tuple[Any, ...]) -> None:
        frame = call.frame
        assert frame is not None
        frame.targets, frame.probs, work = value
        state = call.run.state
        if state is None:
            # Shards of equal work, not of equal length: constant channels cost no pass.
            ranges = balanced_ranges(work.int().tolist(), self.shards_per_frame)
        else:  # a FrameView: the stream's state plans the passes; each costs the same
            plan = state.plan(work, frame.targets)
            frame.reuse = (work, plan)
            count = int(plan.channels.numel())
            if count == 0:  # nothing moved: the frame is done without a masked pass
                self._reused_frame_done(call.run, frame, [])
                return
            ranges = balanced_ranges([1] * count, min(self.shards_per_frame, count))
        call.run.tracker.plan(frame.seq, ranges)
        for shard, (start, stop) in enumerate(ranges):
            # The classifying worker holds this frame's base pass: give it the first shard.
            prefer = slot if shard == 0 else None
            self._queue(_Call(call.run, Kind.SHARD, frame, shard, start, stop, prefer))

    def _frame_done(self, run: _Run, frame: FrameState[ShardResult]) -> None:
        partials = run.tracker.take_partials(frame.seq)
        if frame.reuse is not None:  # each partial is the logits (R, C) of its channels
            self._reused_frame_done(run, frame, partials)
            return
        maps = combine_shards(partials)[0]  # (T, S, S)
        skipped = sum(int(p.skipped[0]) for p in partials)
        passes = sum(p.stop - p.start for p in partials) - skipped
        seconds = time.perf_counter() - (frame.began or time.perf_counter())
        index, targets, probs = frame.task.index, frame.targets, frame.probs
        result = make_result(index, maps, targets, probs, skipped, seconds, passes)
        self._combined(run, frame, result)

    def _reused_frame_done(self, run: _Run, frame: FrameState[Any], logits: list[Any]) -> None:
        """Finish a frame of a reusing run from its shards' logits (R_i, C), in shard order."""
        assert run.state is not None
        view, plan = frame.reuse
        fresh = torch.cat(logits) if logits else torch.empty(0, view.logits.shape[0])
        outcome = run.state.finish(view, plan, fresh, frame.targets)
        skipped = int((~view.live).sum())
        seconds = time.perf_counter() - (frame.began or time.perf_counter())
        index, targets, probs = frame.task.index, frame.targets, frame.probs
        result = make_result(index, outcome.maps, targets, probs, skipped, seconds, 0, outcome)
        self._combined(run, frame, result)

    def _combined(self, run: _Run, frame: FrameState[Any], result: FrameResult) -> None:
        """Send a frame's result on: to its metric passes first with ``--metrics``."""
        if self.scoring:  # its metric passes first, on whichever worker is free
            frame.result = result
            self._queue(_Call(run, Kind.SCORE, frame))
            return
        self._out(run, frame, result)

    def _scored(self, run: _Run, frame: FrameState[ShardResult], scores: FrameScores) -> None:
        self._out(run, frame, dataclasses.replace(frame.result, scores=scores))

    def _out(self, run: _Run, frame: FrameState[ShardResult], result: FrameResult) -> None:
        run.buffer.push(frame.seq, (frame.payload, result))
        frame.ref = frame.payload = None  # the model input may leave the object store now
