"""The worker calls of the frame protocol: one class per call, and the run they belong to.

A frame's calls, in order: :class:`Classify` (its base pass, targets and the work of each
channel), one :class:`Shard` per channel range, then :class:`Score` with ``--metrics``. A run
that reuses passes across frames (``--fidelity`` below 1) asks :class:`View` instead of
:class:`Classify` and one :class:`ChannelLogits` per range of the channels its stream's state
chose. :class:`ClassifyFrames` is the logits of a stack of model inputs (no frame).

Each call knows the worker method it sends (:meth:`Call.send`), what its reply does
(:meth:`Call.answered`: plan the frame's shards, sum them, score the map, put the result out) and
how it fails (:meth:`Call.failed`, the one retry policy). The explainer only queues, sends and
hands replies back; the calls work under its lock.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from ..errors import ScoreCamError
from ..records import FrameResult, make_result
from ..reuse import StreamState
from ..scheduler.health import Failure, RetryPolicy, Slot
from ..scheduler.inflight import FrameState, InflightTracker, ReorderBuffer
from ..scheduler.planning import balanced_ranges
from ..weighting import ShardResult, combine_shards

log = logging.getLogger(__name__)


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


@dataclass(eq=False)
class Run:
    """One ``explain`` (or ``classify``) call: its frames, output order and reuse state."""

    order: int  # when it began, on the clock its frames' turns are taken from
    tracker: InflightTracker[Any]  # partials: ShardResult, or logits (R, C) when reusing
    max_held: int
    buffer: ReorderBuffer[tuple[Any, FrameResult | None]] = field(default_factory=ReorderBuffer)
    next_seq: int = 0
    closed: bool = False  # abandoned or finished: its calls still in flight are only collected
    error: BaseException | None = None  # raised in the run's own thread at its next step
    state: StreamState | None = None  # --fidelity below 1: the stream's reuse state

    def out(self, frame: FrameState[Any], result: FrameResult) -> None:
        """Hand a frame's result to the output order; its model input is no longer needed."""
        self.buffer.push(frame.seq, (frame.payload, result))
        frame.ref = frame.payload = None  # the model input may leave the object store now


@dataclass(frozen=True)
class Context:
    """What a call needs of its explainer: the protocol's settings and the queue of calls."""

    topk: int  # classes explained per frame (when not fixed)
    shards_per_frame: int  # channel ranges per frame, at most
    scoring: bool  # --metrics: each frame's map is scored on a worker too
    queue: Callable[[Call], None]  # queues a call, to be sent when a worker has room


@dataclass(eq=False)
class Call(ABC):
    """One worker call of a run: sent, answered, or failed and sent again."""

    method: ClassVar[str]  # the worker's method it calls

    run: Run
    prefer: Slot | None = field(default=None, kw_only=True)  # the worker to send it to first
    failures: int = field(default=0, init=False)  # exceptions raised inside the worker
    losses: int = field(default=0, init=False)  # times its worker died under it

    def send(self, pool: Pool, slot: Slot, context: Context) -> None:
        """Send this call to ``slot``; the pool's reply carries it as its tag."""
        pool.submit(slot, self, self.method, *self.args(context))

    @abstractmethod
    def args(self, context: Context) -> tuple[Any, ...]:
        """Return the arguments of the worker's method."""

    @abstractmethod
    def answered(self, value: Any, slot: Slot, context: Context) -> None:
        """Take the worker's ``value`` (from ``slot``): queue the next calls, or a result out."""

    @abstractmethod
    def describe(self) -> str:
        """Return what the call computes, for messages (e.g. "frame 3: shard [0, 8)")."""

    def rank(self, fair: bool) -> tuple[int, int, int]:
        """Return the call's place in the queue, the lowest sent first.

        (run, frame, shard): the oldest run's first frame first. ``fair``: (turn, shard, 0),
        the frames of every run in the order they were admitted, so that concurrent runs (live
        streams) take turns.
        """
        return (self.run.order, -1, 0)  # no frame: the run's own turn, in either order

    def failed(self, failure: Failure, policy: RetryPolicy) -> ScoreCamError | None:
        """Count ``failure``; return the run's error, or None when the call is to go again."""
        if failure.lost:
            self.losses += 1
        else:
            self.failures += 1
        if policy.retry(self.failures, self.losses, failure):
            if not failure.lost:
                log.warning(
                    "%s failed (%s); retry %d of %d",
                    self.describe(),
                    failure.cause,
                    self.failures,
                    policy.max_failures,
                )
            return None
        if not failure.retryable:  # a user mistake: its message says what to change
            return ScoreCamError(failure.cause)
        if failure.lost:
            return ScoreCamError(
                f"{self.describe()} failed: its worker died {self.losses} times ({failure.cause})"
            )
        return ScoreCamError(f"{self.describe()} failed: {failure.cause}")


@dataclass(eq=False)
class ClassifyFrames(Call):
    """The logits (N, C) of a batch of model inputs ``xs`` (N, 3, S, S), on one worker."""

    method = "classify_frames"

    xs: torch.Tensor
    logits: torch.Tensor | None = field(default=None, init=False)  # the reply, once back

    def args(self, context: Context) -> tuple[Any, ...]:
        return (self.xs,)

    def answered(self, value: Any, slot: Slot, context: Context) -> None:
        self.logits = value

    def describe(self) -> str:
        return f"batch classification of {len(self.xs)} frames"


@dataclass(eq=False)
class FrameCall(Call):
    """A call about one frame of the run."""

    frame: FrameState[Any]

    def send(self, pool: Pool, slot: Slot, context: Context) -> None:
        super().send(pool, slot, context)
        if self.frame.began is None:  # a frame's time runs from its first call
            self.frame.began = time.perf_counter()

    def rank(self, fair: bool) -> tuple[int, int, int]:
        frame, part = self.frame, self.part()
        return (frame.turn, part, 0) if fair else (self.run.order, frame.seq, part)

    def part(self) -> int:
        """Return the call's place among its frame's calls: its shard, 0 for the others."""
        return 0

    def finished(self, result: FrameResult, context: Context) -> None:
        """Send the frame's ``result`` on: to its metric passes first with ``--metrics``."""
        if context.scoring:  # its metric passes first, on whichever worker is free
            self.frame.result = result
            context.queue(Score(self.run, self.frame))
            return
        self.run.out(self.frame, result)

    def reused_result(self) -> FrameResult:
        """Return the result of a reusing run's frame once its last round is in."""
        state, frame = self.run.state, self.frame
        assert state is not None
        plan = frame.reuse
        outcome = state.finish(plan)
        skipped = int((~plan.view.live).sum())
        index, targets, probs = frame.task.index, frame.targets, frame.probs
        return make_result(index, outcome.maps, targets, probs, skipped, self.seconds(), 0, outcome)

    def seconds(self) -> float:
        """Return the seconds since the frame's first call was sent."""
        return time.perf_counter() - (self.frame.began or time.perf_counter())


@dataclass(eq=False)
class Classify(FrameCall):
    """A frame's base pass on one worker: its targets and the work of each channel."""

    method = "targets_and_passes"

    def args(self, context: Context) -> tuple[Any, ...]:
        frame = self.frame
        return (frame.key, frame.ref, frame.task.targets, context.topk)

    def answered(self, value: Any, slot: Slot, context: Context) -> None:
        self.frame.targets, self.frame.probs, work = value
        # Shards of equal work, not of equal length: constant channels cost no pass.
        ranges = balanced_ranges(work.int().tolist(), context.shards_per_frame)
        _queue_shards(Shard, self, ranges, slot, context)

    def describe(self) -> str:
        return f"frame {self.frame.task.index}: classification"


@dataclass(eq=False)
class View(Classify):
    """A reusing run's :class:`Classify`: the frame's targets and its view for the stream state."""

    method = "view"

    def answered(self, value: Any, slot: Slot, context: Context) -> None:
        frame, state = self.frame, self.run.state
        assert state is not None
        frame.targets, frame.probs, view = value
        frame.reuse = state.plan(view, frame.targets)  # its first round of channels
        if not frame.reuse.channels.numel():  # nothing moved: done without a masked pass
            self.finished(self.reused_result(), context)
            return
        _queue_round(self, slot, context)


@dataclass(eq=False)
class Shard(FrameCall):
    """Channels [start, stop) of a frame: its partial map."""

    method = "shard"

    shard: int  # its place among the frame's shards: partials are summed in this order
    start: int
    stop: int

    def args(self, context: Context) -> tuple[Any, ...]:
        frame = self.frame
        return (frame.key, frame.ref, frame.targets, self.start, self.stop)

    def answered(self, value: Any, slot: Slot, context: Context) -> None:
        tracker, seq = self.run.tracker, self.frame.seq
        if tracker.done(seq, self.shard, value):
            self.finished(self.combine(tracker.take_partials(seq)), context)

    def combine(self, partials: list[ShardResult]) -> FrameResult:
        """Return the frame's result from the partials of all its shards, in shard order."""
        frame = self.frame
        maps = combine_shards(partials)[0]  # (T, S, S)
        skipped = sum(int(p.skipped[0]) for p in partials)
        passes = sum(p.stop - p.start for p in partials) - skipped
        index, targets, probs = frame.task.index, frame.targets, frame.probs
        return make_result(index, maps, targets, probs, skipped, self.seconds(), passes)

    def part(self) -> int:
        return self.shard

    def describe(self) -> str:
        return f"frame {self.frame.task.index}: shard [{self.start}, {self.stop})"


@dataclass(eq=False)
class ChannelLogits(Shard):
    """A reusing run's :class:`Shard`: the masked-pass logits (R, C) of ``channels``, places
    [start, stop) of one round of its frame's plan."""

    method = "channel_logits"

    channels: torch.Tensor = field(kw_only=True)
    round: int = field(kw_only=True)  # the plan's round it belongs to

    def args(self, context: Context) -> tuple[Any, ...]:
        frame = self.frame
        return (frame.key, frame.ref, self.channels)

    def answered(self, value: Any, slot: Slot, context: Context) -> None:
        plan, state = self.frame.reuse, self.run.state
        assert state is not None
        if self.round != plan.asked:
            return  # a copy of an earlier round's call, sent twice: that round is counted
        tracker, seq = self.run.tracker, self.frame.seq
        if not tracker.done(seq, self.shard, value):
            return
        state.absorb(plan, torch.cat(tracker.take_partials(seq)))
        if plan.channels.numel():  # the map has not settled: the next round
            _queue_round(self, slot, context)
            return
        self.finished(self.reused_result(), context)


@dataclass(eq=False)
class Score(FrameCall):
    """A frame's faithfulness metrics (``--metrics``), once its map is summed."""

    method = "score"

    def args(self, context: Context) -> tuple[Any, ...]:
        result = self.frame.result
        return (self.frame.ref, result.maps[0], int(result.targets[0]))

    def answered(self, value: Any, slot: Slot, context: Context) -> None:
        self.run.out(self.frame, dataclasses.replace(self.frame.result, scores=value))

    def describe(self) -> str:
        return f"frame {self.frame.task.index}: metrics"


def _queue_round(call: FrameCall, slot: Slot, context: Context) -> None:
    """Queue one :class:`ChannelLogits` per range of the frame's next round of channels."""
    run, frame = call.run, call.frame
    plan = frame.reuse
    count = int(plan.channels.numel())
    # Every planned channel costs one pass.
    ranges = balanced_ranges([1] * count, min(context.shards_per_frame, count))
    if plan.asked == 0:
        run.tracker.plan(frame.seq, ranges)
    else:
        run.tracker.replan(frame.seq, ranges)
    for shard, (start, stop) in enumerate(ranges):
        prefer = slot if shard == 0 else None  # its worker holds the frame's base pass
        channels = plan.channels[start:stop]
        context.queue(
            ChannelLogits(
                run, frame, shard, start, stop, prefer=prefer, channels=channels, round=plan.asked
            )
        )


def _queue_shards(
    kind: type[Shard],
    classified: FrameCall,
    ranges: list[tuple[int, int]],
    slot: Slot,
    context: Context,
) -> None:
    """Plan a classified frame into ``ranges`` and queue one ``kind`` of call per range."""
    run, frame = classified.run, classified.frame
    run.tracker.plan(frame.seq, ranges)
    for shard, (start, stop) in enumerate(ranges):
        # The classifying worker holds this frame's base pass: give it the first shard.
        prefer = slot if shard == 0 else None
        context.queue(kind(run, frame, shard, start, stop, prefer=prefer))
