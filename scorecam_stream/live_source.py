"""A live source read in a thread at its own pace: every frame for the output, the newest one
for the explainer (see :mod:`scorecam_stream.live`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from . import video

log = logging.getLogger(__name__)

_WAIT_S = 0.1  # a blocked wait wakes this often, so Ctrl-C and a stopped source are seen soon
_STALL_GRACE_S = 2.0  # past FFmpeg's own read timeout, before the reader is given up on


class LiveSource:
    """Decodes frames in a thread at the source's pace; never waits for the explainer.

    Every frame goes to :meth:`output_frames` (for the encoder; if the encoder falls more
    than ``backlog`` frames behind, the oldest are dropped, with a warning); the newest one is
    kept for :meth:`newest_after` (for the explainer). ``duration`` stops after that many
    seconds of source; ``read_timeout`` ends the source when no frame came for that long.
    ``pace``: hand frames over no faster than their timestamps (a file played as if live).
    ``reconnecting()`` says that the input is being reopened (a silence then is no stall);
    ``on_behind()`` is called, from the reader thread, each time the frames waiting for the
    encoder pass half the backlog once the encoder takes frames (before any is dropped).

    The output comes first: while more than half the backlog waits for the encoder, no new
    frame is handed to the explainer, so that on a machine with too few cores for both, torch
    pauses and the encoder catches up; maps get rarer instead of frames being dropped.
    """

    def __init__(
        self,
        frames: Iterator[video.Frame],
        backlog: int,
        read_timeout: float | None,
        duration: float | None = None,
        pace: bool = False,
        reconnecting: Callable[[], bool] | None = None,
        on_behind: Callable[[], None] | None = None,
    ) -> None:
        self._frames = frames
        self._on_behind = on_behind  # the output's queue passed half the backlog
        self._draining = False  # output_frames() runs: a queue that grows now is the encoder's
        self._behind = False
        self._held = False  # the explainer waits for the encoder to catch up
        self.holds = 0  # how often it had to
        self._reconnecting = reconnecting  # the input is being reopened: not a stall
        self._pace = pace
        self._backlog = backlog
        self._read_timeout = read_timeout
        self._duration = duration
        self._cond = threading.Condition()
        self._newest: video.Frame | None = None
        self._pending: deque[video.Frame] = deque()
        self._error: BaseException | None = None
        self._last_arrival = time.monotonic()
        self.ended = False
        self.stopped = False
        self.end_reason: str | None = None  # "duration", "read timeout", "signal"; None: EOF
        self.frames_in = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="live-read")
        self._thread.start()

    def _run(self) -> None:
        first: float | None = None
        began = time.monotonic()
        try:
            for frame in self._frames:
                if first is None:
                    first = frame.seconds
                if self._duration is not None and frame.seconds - first >= self._duration:
                    self._end("duration")
                    return
                if self._pace:
                    time.sleep(max(0.0, began + frame.seconds - first - time.monotonic()))
                    frame = dataclasses.replace(frame, arrival=time.monotonic())
                with self._cond:
                    if self.stopped:
                        return
                    self._newest = frame
                    self._last_arrival = frame.arrival
                    self.frames_in += 1
                    self._pending.append(frame)
                    self._watch_backlog()
                    if len(self._pending) > self._backlog:
                        self._pending.popleft()
                        if self.dropped == 0:
                            log.warning("the encoder cannot keep up: dropping output frames")
                        self.dropped += 1
                    self._cond.notify_all()
        except BaseException as err:  # raised in the consumers' threads
            self._error = err
        self._end(None)

    def _end(self, reason: str | None) -> None:
        with self._cond:
            if not self.ended:
                self.ended = True
                self.end_reason = self.end_reason or reason
            self._cond.notify_all()

    def _watch_backlog(self) -> None:
        """Call ``on_behind`` as the output's queue passes half the backlog (before any drop)."""
        above = len(self._pending) > self._backlog // 2
        if above and not self._behind and self._draining and self._on_behind is not None:
            self._on_behind()
        self._behind = above

    def _check_stall(self) -> None:
        """End the source when no frame came for too long (a read FFmpeg cannot interrupt)."""
        if self._read_timeout is None or self.ended:
            return
        if self._reconnecting is not None and self._reconnecting():
            self._last_arrival = time.monotonic()  # reopening has its own timeouts
            return
        if time.monotonic() - self._last_arrival > self._read_timeout + _STALL_GRACE_S:
            log.warning("no frame for %g s; taking the input as ended", self._read_timeout)
            self.ended = True
            self.end_reason = "read timeout"

    def _hold_explainer(self) -> bool:
        """Return whether the explainer should wait: the encoder is far behind (see above)."""
        # No band between holding and letting go: a map is started whenever the queue is at
        # most half full, and half the backlog is left for the frames that pile up meanwhile.
        behind = self._draining and not self.ended and len(self._pending) > self._backlog // 2
        if behind and not self._held:
            self.holds += 1
            level = logging.WARNING if self.holds == 1 else logging.DEBUG
            log.log(level, "the encoder falls behind: no new map until it catches up")
        self._held = behind
        return behind

    def newest_after(self, index: int) -> video.Frame | None:
        """Return the newest frame once one with ``index`` or later has come (and the encoder
        is not far behind); None at the end."""
        with self._cond:
            while True:
                newest = self._newest
                ready = newest is not None and newest.index >= index and not self.stopped
                if ready and not self._hold_explainer():
                    return newest
                if self.ended:
                    if self._error is not None:
                        raise self._error
                    return None
                self._cond.wait(_WAIT_S)
                self._check_stall()

    def output_frames(self) -> Iterator[video.Frame]:
        """Yield every frame in order (less any dropped) until the source ends."""
        with self._cond:
            self._draining = True
            # What queued while the run started is no sign of an encoder falling behind.
            self._behind = len(self._pending) > self._backlog // 2
        while True:
            with self._cond:
                while not self._pending and not self.ended:
                    self._cond.wait(_WAIT_S)
                    self._check_stall()
                if not self._pending:
                    if self._error is not None:
                        raise self._error
                    return
                frame = self._pending.popleft()
            yield frame

    def stop(self, reason: str) -> None:
        """End the source now (frames already read still go to the output)."""
        with self._cond:
            self.stopped = True
            self.end_reason = self.end_reason or reason
            self.ended = True
            self._cond.notify_all()

    def join(self, timeout: float) -> bool:
        """Wait for the reader thread; return whether it has finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
