"""A live source's clock: frames whose timestamps only go forward, whatever the source does.

A camera or an encoder that restarts starts its timestamps again (often from 0), and one that
reconnects may come back anywhere on its clock. Such a break is a discontinuity, not an error:
the frames after it are shifted so that the first one follows the last one before it by the
source's own frame spacing, and the output plays on as one continuous stream.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections import deque
from collections.abc import Iterable, Iterator
from fractions import Fraction

from .records import Frame

log = logging.getLogger("scorecam_stream.video")

JUMP_S = 1.0  # timestamps ahead of the wall clock by more than this (and 10 frames): a break
_SPACINGS = 9  # the frame spacing is the median of this many recent ones


class Timeline:
    """Renumbers and re-times a live source's frames across its restarts and reconnects.

    Each frame given to :meth:`frames` comes out with the next ``index`` and, after a
    discontinuity, its ``pts``/``seconds`` (and its audio packets' timestamps) shifted by the
    same offset. A discontinuity is a timestamp that does not go forward, one that jumps ahead
    of the wall clock (``wall_clock``: the source is real-time; arrival times say how much time
    passed), or one announced by :meth:`mark` (a reconnect). :attr:`discontinuities` holds the
    indices of the frames that follow one.
    """

    def __init__(self, fps: float, wall_clock: bool) -> None:
        self._wall_clock = wall_clock
        self._rate_spacing = Fraction(1 / fps).limit_denominator(1001)
        self._spacings: deque[Fraction] = deque(maxlen=_SPACINGS)
        self._offset = Fraction(0)  # seconds added to the source's timestamps
        self._last: tuple[Fraction, Fraction, float] | None = None  # source s, output s, arrival
        self._marked = False
        self._next_index = 0
        self.discontinuities: list[int] = []

    @property
    def spacing(self) -> Fraction:
        """Return the source's frame spacing in seconds (the median of the recent ones)."""
        return statistics.median(self._spacings) if self._spacings else self._rate_spacing

    def mark(self) -> None:
        """Take the next frame as the first after a break (the source was reopened)."""
        self._marked = True

    def frames(self, source: Iterable[Frame]) -> Iterator[Frame]:
        """Yield ``source``'s frames renumbered and, across breaks, re-timed."""
        for frame in source:
            yield self._place(frame)

    def _place(self, frame: Frame) -> Frame:
        index, self._next_index = self._next_index, self._next_index + 1
        if frame.pts is None:  # no timestamp to correct: the writer spaces it by the rate
            return dataclasses.replace(frame, index=index)
        source = frame.pts * frame.time_base
        if self._last is not None:
            last_source, last_out, last_arrival = self._last
            step = source - last_source
            broken = self._marked or step <= 0
            if not broken and self._wall_clock:
                ahead = float(step) - (frame.arrival - last_arrival)
                broken = ahead > max(JUMP_S, 10 * float(self.spacing))
            if broken:
                self._offset = last_out + self.spacing - source
                self.discontinuities.append(index)
                log.warning(
                    "the source's timestamps jump from %.3f s to %.3f s (%s); the output "
                    "goes on at %.3f s",
                    last_source,
                    source,
                    "it was reopened" if self._marked else "a restart?",
                    last_out + self.spacing,
                )
            elif step <= 2 * self.spacing or (len(self._spacings) < 3 and step < JUMP_S):
                self._spacings.append(step)
        self._marked = False
        out = source + self._offset
        self._last = (source, out, frame.arrival)
        if self._offset == 0:
            return dataclasses.replace(frame, index=index)
        pts = round(out / frame.time_base)
        for packet in frame.audio:
            shift = round(self._offset / packet.time_base)
            if packet.pts is not None:
                packet.pts += shift
            if packet.dts is not None:
                packet.dts += shift
        seconds = float(pts * frame.time_base)
        return dataclasses.replace(frame, index=index, pts=pts, seconds=seconds)
