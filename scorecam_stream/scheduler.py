"""Pure planning for the distributed explainer: shards, in-flight bounds, ordering, faults.

No Ray and no torch here: every decision is a function of plain numbers or a small bookkeeping
object, so it is tested without a cluster (``tests/test_scheduler.py``).
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")

# The frames in flight hold the payload (often the full-resolution frame) and the model input on
# the driver; beyond this many, more frames add memory without adding throughput, because every
# frame is already split over all the workers.
MAX_INFLIGHT_FRAMES = 32


def shard_ranges(num_channels: int, num_shards: int) -> list[tuple[int, int]]:
    """Return contiguous channel ranges [start, stop) that cover [0, num_channels) once, in order.

    The ranges differ in length by at most one (the longer ones first) and are never empty:
    asking for more shards than channels gives one range per channel.
    """
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    count = min(num_shards, num_channels)
    size, extra = divmod(num_channels, count)
    ranges = []
    start = 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def balanced_ranges(costs: Sequence[int], num_shards: int) -> list[tuple[int, int]]:
    """Return contiguous ranges that cover [0, len(costs)) once, in order, of about equal cost.

    ``costs[i]`` is the work of channel i: its masked forward passes, 1, or 0 for a constant
    channel that the engine skips. Equal-length ranges can differ a lot in work (constant
    channels cluster), and the busiest shard sets a frame's latency; here each cut falls where
    the running cost first reaches its share of the total. With the engine's 0/1 costs and at
    least one pass per shard, the ranges' costs differ by at most one. Ranges are never empty;
    with no cost at all they are the equal-length ones of :func:`shard_ranges`.
    """
    if any(c < 0 for c in costs):
        raise ValueError("costs must be >= 0")
    k = len(costs)
    total = sum(costs)
    if total == 0:
        return shard_ranges(k, num_shards)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    count = min(num_shards, k)
    prefix = list(itertools.accumulate(costs, initial=0))  # prefix[m] = cost of [0, m)
    cuts = [0]
    for j in range(1, count):
        share = -(-j * total // count)  # ceil(j * total / count): integers, no rounding
        at = bisect.bisect_left(prefix, share)  # first m whose prefix reaches the share
        # Never empty: after the previous cut, and room left for the ranges still to come.
        cuts.append(min(max(at, cuts[-1] + 1), k - (count - j)))
    cuts.append(k)
    return list(itertools.pairwise(cuts))


def default_shards_per_frame(num_workers: int) -> int:
    """Return how many shards a frame is split into by default: one per worker.

    Every worker then gets about one shard of every frame, so a frame's latency shrinks with the
    number of workers while each worker runs one base forward per frame (the cost of a shard
    beyond its masked passes: 1 forward in 513 for VGG16 on 8 workers at most 8/513 = 1.6 %).
    Finer shards would balance better within a frame but repeat that base forward on more
    workers; the balance across workers comes instead from several frames being in flight, each
    shard going to whichever worker is free.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    return num_workers


def default_max_inflight(num_workers: int) -> int:
    """Return how many frames may be in flight by default: ``2 + num_workers``, at most 32.

    A frame is split over all the workers, so two frames in flight keep every worker busy (one
    being computed, the next one's shards queued); the extra ``num_workers`` frames absorb a slow
    frame holding up the in-order output while later frames finish behind it.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    return min(2 + num_workers, MAX_INFLIGHT_FRAMES)


def max_held_items(max_inflight: int) -> int:
    """Return how many input items (frames plus pass-through items) may wait for output at once.

    Pass-through items (no task) cost no work but keep their payload until every earlier frame
    is out; this bounds them when frames are explained sparsely (``--every N``).
    """
    if max_inflight < 1:
        raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
    return 8 * max_inflight + 16


class ReorderBuffer(Generic[T]):
    """Items pushed in any order by a consecutive index (0, 1, 2, ...), popped in index order."""

    def __init__(self, first: int = 0) -> None:
        self._next = first
        self._items: dict[int, T] = {}

    @property
    def next_index(self) -> int:
        """Return the index the next popped item will have."""
        return self._next

    def push(self, index: int, item: T) -> None:
        """Keep ``item`` until every item before ``index`` has been popped."""
        if index < self._next or index in self._items:
            raise ValueError(f"index {index} was already pushed")
        self._items[index] = item

    def pop(self) -> T | None:
        """Return the next item in index order if it has arrived, else None."""
        if self._next not in self._items:
            return None
        item = self._items.pop(self._next)
        self._next += 1
        return item

    def pop_ready(self) -> Iterator[T]:
        """Yield (and remove) the items that are next in index order, as far as they go."""
        while self._next in self._items:
            item = self._items.pop(self._next)
            self._next += 1
            yield item

    def __len__(self) -> int:
        return len(self._items)


@dataclass(eq=False)
class FrameState(Generic[T]):
    """Everything the driver knows of one frame in flight: the one record of a frame.

    Admitted (its input item), classified (``targets``, ``probs``), planned into shards
    (``ranges``), completed shard by shard (``partials`` of type T, in any order), combined
    (``result``, which may still wait for its metric passes), and released once it has left.
    """

    seq: int  # position in its run's input: the order of output
    key: Any = None  # the workers' cache key: unique among every frame its workers see
    payload: Any = None  # what the caller gets back with the result
    task: Any = None  # the frame's FrameTask
    ref: Any = None  # where its model input is (an object-store reference)
    began: float | None = None  # when its first call was sent
    targets: Any = None  # (T,) classes, as the classifying worker resolved them
    probs: Any = None  # (T,) their probabilities
    ranges: list[tuple[int, int]] | None = None  # None until the frame is planned
    partials: list[T | None] = field(default_factory=list)
    outstanding: set[int] = field(default_factory=set)
    result: Any = None  # the combined FrameResult, while its metric passes run
    reuse: Any = None  # --fidelity below 1: (FrameView, Plan) once classified


class InflightTracker(Generic[T]):
    """Which frames are in flight, which of their shards are outstanding, and their partials.

    A frame is admitted (counts against ``max_frames``), planned into shards, completed shard by
    shard in any order, its partials taken in shard order, and released once it has left the
    explainer; only then is its slot free.
    """

    def __init__(self, max_frames: int) -> None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.max_frames = max_frames
        self._frames: dict[int, FrameState[T]] = {}

    @property
    def full(self) -> bool:
        """Return whether no further frame may be admitted."""
        return len(self._frames) >= self.max_frames

    def admit(self, frame: int, **fields: Any) -> FrameState[T]:
        """Count ``frame`` as in flight and return its record; its shards are not known yet."""
        if self.full:
            raise RuntimeError(f"{self.max_frames} frames are already in flight")
        if frame in self._frames:
            raise ValueError(f"frame {frame} is already in flight")
        state: FrameState[T] = FrameState(frame, **fields)
        self._frames[frame] = state
        return state

    def __getitem__(self, frame: int) -> FrameState[T]:
        return self._frames[frame]

    def plan(self, frame: int, ranges: Sequence[tuple[int, int]]) -> None:
        """Set the shards (channel ranges) of ``frame``; all of them become outstanding."""
        state = self._frames[frame]
        if state.ranges is not None:
            raise ValueError(f"frame {frame} is already planned")
        if not ranges:
            raise ValueError(f"frame {frame} needs at least one shard")
        state.ranges = list(ranges)
        state.partials = [None] * len(ranges)
        state.outstanding = set(range(len(ranges)))

    def ranges(self, frame: int) -> list[tuple[int, int]]:
        """Return the channel ranges of ``frame``'s shards, in shard order."""
        ranges = self._frames[frame].ranges
        if ranges is None:
            raise ValueError(f"frame {frame} is not planned yet")
        return ranges

    def outstanding(self, frame: int) -> list[int]:
        """Return the shards of ``frame`` whose partial has not arrived, in shard order."""
        return sorted(self._frames[frame].outstanding)

    def done(self, frame: int, shard: int, partial: T) -> bool:
        """Record ``shard``'s partial; return True when it completes the frame.

        A shard that already arrived (a call that was sent twice) is ignored and returns False.
        """
        state = self._frames[frame]
        if state.ranges is None or not 0 <= shard < len(state.ranges):
            raise ValueError(f"frame {frame} has no shard {shard}")
        if shard not in state.outstanding:
            return False
        state.partials[shard] = partial
        state.outstanding.discard(shard)
        return not state.outstanding

    def complete(self, frame: int) -> bool:
        """Return whether every shard of ``frame`` has arrived."""
        state = self._frames[frame]
        return state.ranges is not None and not state.outstanding

    def take_partials(self, frame: int) -> list[T]:
        """Return the partials of a complete frame in shard order (the frame keeps its slot)."""
        if not self.complete(frame):
            raise ValueError(f"frame {frame} is not complete")
        state = self._frames[frame]
        partials = cast("list[T]", state.partials)  # complete: no None left
        state.partials = []
        return partials

    def release(self, frame: int) -> None:
        """Free the slot of ``frame`` (it has left the explainer)."""
        del self._frames[frame]

    def __contains__(self, frame: object) -> bool:
        return frame in self._frames

    def __len__(self) -> int:
        return len(self._frames)


# ---------------------------------------------------------------------- workers and faults

CALLS_PER_WORKER = 2  # outstanding calls per worker: one running, the next already queued there
PROBE_DELAYS = (0.2, 0.5, 1.0)  # seconds between "are you back?" calls to a restarting worker
MAX_PROBE_FAILURES = 5  # probes that found a worker dead (not restarting) before it is gone
MAX_WORKER_LOSSES = 4  # a call whose worker died this often is suspected of killing it


class SlotState(enum.Enum):
    """Where a worker stands, as the driver knows it."""

    UP = "up"  # takes calls
    RESTARTING = "restarting"  # died; probed until it answers again
    GONE = "gone"  # dead for good: restarts exhausted, failed to start, or never came back


@dataclass(eq=False)
class Slot:
    """One worker of a pool and what the driver knows of it (no Ray here: plain numbers)."""

    index: int
    state: SlotState = SlotState.UP
    busy: int = 0  # calls sent and not yet collected
    sent: int = 0  # calls sent in all (ties of the least-busy choice go to the least used)
    where: str = ""  # "pid P on HOST (node N)" once known, for messages
    down_since: float | None = None
    probe_at: float | None = None  # when to ask it whether it is back; None: not due
    probes: int = 0  # probes that failed since it died
    dead_probes: int = 0  # of those, the ones that found it dead rather than restarting

    def lost(self, now: float) -> bool:
        """Mark the worker dead (probed from ``now`` on); return False if it was not up."""
        if self.state is not SlotState.UP:
            return False
        self.state, self.down_since = SlotState.RESTARTING, now
        self.probes = self.dead_probes = 0
        self.probe_at = now + PROBE_DELAYS[0]
        return True

    def probe_failed(self, now: float, *, dead: bool, for_good: bool = False) -> bool:
        """Count a failed probe; return True when the worker is now gone for good.

        ``dead``: it is not restarting (Ray said so); ``for_good``: it can never come back
        (its constructor failed, or Ray gave up restarting it).
        """
        self.probes += 1
        self.dead_probes += dead
        if for_good or self.dead_probes >= MAX_PROBE_FAILURES:
            self.state, self.probe_at = SlotState.GONE, None
            return True
        self.probe_at = now + PROBE_DELAYS[min(self.probes, len(PROBE_DELAYS) - 1)]
        return False

    def back(self, where: str) -> None:
        """Mark a restarted worker up again."""
        self.state, self.where = SlotState.UP, where
        self.down_since = self.probe_at = None
        self.probes = self.dead_probes = 0


def pick_slot(
    slots: Sequence[Slot], prefer: Slot | None = None, capacity: int = CALLS_PER_WORKER
) -> Slot | None:
    """Return the worker for the next call: ``prefer`` if it has room, else the least busy one.

    None when no worker that is up has room.
    """
    if prefer is not None and prefer.state is SlotState.UP and prefer.busy < capacity:
        return prefer
    free = [s for s in slots if s.state is SlotState.UP and s.busy < capacity]
    return min(free, key=lambda s: (s.busy, s.sent)) if free else None


def probes_due(slots: Sequence[Slot], now: float) -> tuple[list[Slot], float | None]:
    """Return (the workers to probe now, seconds until the next probe after them or None)."""
    due = [s for s in slots if s.probe_at is not None and s.probe_at <= now]
    later = [s.probe_at - now for s in slots if s.probe_at is not None and s.probe_at > now]
    return due, (min(later) if later else None)


def none_left(slots: Sequence[Slot], now: float, timeout: float) -> bool:
    """Return whether the pool has given up: no worker up, and none can come back in time.

    True when every worker is gone, or none has been up for ``timeout`` seconds.
    """
    if not slots or any(s.state is SlotState.UP for s in slots):
        return not slots
    if all(s.state is SlotState.GONE for s in slots):
        return True
    last = max(s.down_since or 0.0 for s in slots)
    return now - last > timeout


@dataclass(frozen=True)
class Failure:
    """Why a call did not return a value."""

    cause: str  # one line: the worker's exception, or why the worker went away
    lost: bool  # the worker died or its node went away (else: an exception inside the call)
    retryable: bool = True  # False: the same call would fail again (a user mistake)


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry rule: whether a call that failed is sent again."""

    max_failures: int = 2  # exceptions inside a worker (e.g. CUDA OOM) per call, then give up
    max_losses: int = MAX_WORKER_LOSSES  # deaths of its worker per call, then give up

    def retry(self, failures: int, losses: int, failure: Failure) -> bool:
        """Return whether to resend a call that has ``failures``/``losses`` so far (this one in)."""
        if failure.lost:
            return losses <= self.max_losses
        return failure.retryable and failures <= self.max_failures


# Ray keeps fractional resources to 4 decimal places: a share is rounded down to them, so K
# shares of one GPU never add up to more than the whole GPU.
_RAY_RESOURCE_UNIT = 10_000


@dataclass(frozen=True)
class ActorResources:
    """What the Ray actors of a run reserve: how many, and each one's share of the machine."""

    workers: int  # actors to start
    num_gpus: float  # each actor's GPU share: 1 / workers-per-GPU (0: a CPU worker)
    num_cpus: int  # CPUs each actor reserves
    threads: int | None  # torch threads of each actor (None: torch's default, GPU workers)
    gpus_needed: int  # whole GPUs the cluster must have

    def options(self) -> dict[str, float]:
        """Return the resource options of ``ray.remote`` for one actor."""
        if self.num_gpus:
            return {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus}
        return {"num_cpus": self.num_cpus}


def plan_actor_resources(
    *,
    on_gpu: bool,
    gpus: int,
    workers_per_gpu: int,
    workers: int,
    cluster_cpus: int,
    threads_per_worker: int | None = None,
) -> ActorResources:
    """Return the actors to start and what each reserves.

    On GPUs: ``workers_per_gpu`` (K) actors share each of the ``gpus`` (N) GPUs, 1/K of a GPU
    each, so N x K actors on N GPUs; with ``gpus=0``, ``workers`` actors (at least one) with a
    whole GPU each, as ``--workers N --device cuda`` or ``--address`` alone ask. Several
    replicas per GPU help models too small to keep a large GPU busy alone. On CPUs:
    ``workers`` actors (at least one), each with ``threads_per_worker`` torch threads or an
    equal part of the cluster's CPUs.
    """
    if workers_per_gpu < 1:
        raise ValueError(f"workers_per_gpu must be >= 1, got {workers_per_gpu}")
    if gpus < 0 or workers < 0:
        raise ValueError(f"gpus and workers must be >= 0, got {gpus}, {workers}")
    if workers_per_gpu > 1 and not gpus:
        raise ValueError("workers_per_gpu > 1 needs gpus >= 1")
    if on_gpu:
        whole = gpus or max(workers, 1)
        share = (_RAY_RESOURCE_UNIT // workers_per_gpu) / _RAY_RESOURCE_UNIT
        return ActorResources(
            workers=whole * workers_per_gpu,
            num_gpus=1.0 if workers_per_gpu == 1 else share,
            num_cpus=1,
            threads=None,
            gpus_needed=whole,
        )
    count = max(workers, 1)
    threads = threads_per_worker or max(1, cluster_cpus // count)
    return ActorResources(workers=count, num_gpus=0.0, num_cpus=1, threads=threads, gpus_needed=0)
