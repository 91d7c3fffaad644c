"""Worker health and faults: the driver's view of each worker, and the one retry rule.

Each worker's :class:`Slot` (up, restarting, gone), who gets the next call, when to probe a
lost worker, when the pool has given up, and whether a failed call is sent again. Plain numbers
(no Ray), tested without a cluster.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

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
