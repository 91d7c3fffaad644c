"""In-flight bookkeeping: the frames the driver has sent out, their shards, and output order.

Plain objects (no Ray, no torch), tested without a cluster.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")


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
    turn: int = 0  # when it was admitted, among the frames of every run (the fair order)
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
    reuse: Any = None  # --fidelity below 1: its reuse.Plan once classified


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

    def replan(self, frame: int, ranges: Sequence[tuple[int, int]]) -> None:
        """Set the shards of a complete ``frame`` anew: its next round of passes."""
        if not self.complete(frame):
            raise ValueError(f"frame {frame} is not complete")
        self._frames[frame].ranges = None
        self.plan(frame, ranges)

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
