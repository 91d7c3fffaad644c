"""A live network input read across its outages: reopened with backoff when it breaks or ends.

A camera's TCP/HTTP/RTSP/RTMP/SRT connection drops, its server restarts, its encoder reboots:
the input is opened again (after ``delay``, doubled each attempt, at most ``max_delay``) and
the frames go on. The frames after a reopening follow the last ones on the output's clock (a
:class:`~.timeline.Timeline` discontinuity). A UDP (or RTP) input has no connection: when it
falls silent for the read timeout the port is listened to again at once, and its timestamps
alone say whether the stream restarted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from urllib.parse import urlparse

import av

from ..config_video import RECONNECT_ATTEMPTS
from ..errors import ScoreCamError
from .inputs import is_url
from .reader import VideoReader
from .records import Frame
from .timeline import Timeline

log = logging.getLogger("scorecam_stream.video")

_LISTENING = frozenset({"udp", "rtp"})  # connectionless: a silence is no reason to wait more
# Why an input may open a little later (its camera or server not up yet), unlike a wrong
# host name, protocol or path, or data that is not a video.
_NOT_YET = (
    av.error.ConnectionRefusedError,
    av.error.ConnectionResetError,
    av.error.ConnectionAbortedError,
    av.error.TimeoutError,
    av.error.ExitError,  # no data before the read timeout
    av.error.EOFError,
    av.error.HTTPServerError,
)


def is_network_input(path: str) -> bool:
    """Return whether ``path`` is read over a network (udp, tcp, rtsp, http, ...)."""
    return is_url(path) and urlparse(path).scheme.lower() not in ("", "file")


def reconnect_attempts(path: str, given: int | None) -> int:
    """Return how often a broken ``path`` is reopened in a row: ``given`` (--reconnect), else
    RECONNECT_ATTEMPTS for a network input; never for other inputs (a pipe, a device)."""
    if not is_network_input(path):
        if given:
            log.warning("--reconnect: %s is not a network input; it is read once", path)
        return 0
    return RECONNECT_ATTEMPTS if given is None else given


def open_when_up(
    open_reader: Callable[[], VideoReader],
    attempts: int,
    delay: float,
    max_delay: float,
    stop: threading.Event | None = None,
) -> VideoReader:
    """Return ``open_reader()``, tried again with backoff while the input is not up yet.

    A camera or its server may start after the worker: a refused connection, a read timeout or
    a server error is retried up to ``attempts`` times (after ``delay`` s, doubled each time, at
    most ``max_delay``), each said in a log line; the last error is raised, as it is when
    ``stop`` is set. Any other error (an unknown host, a wrong path, not a video) is raised at
    once.
    """
    attempt = 0
    while True:
        try:
            return open_reader()
        except ScoreCamError as err:
            attempt += 1
            if attempt > attempts or not isinstance(err.__cause__, _NOT_YET):
                raise
            wait = min(delay * 2 ** (attempt - 1), max_delay)
            log.warning("%s; trying again in %g s (attempt %d of %d)", err, wait, attempt, attempts)
            if (stop or threading.Event()).wait(wait):
                raise


class ReconnectingInput:
    """The frames of a live input (``reader``, already open) across its outages.

    When its frames end (end of stream, a read error, no data for the read timeout) before
    :meth:`stop`, the input is reopened by ``open_reader`` up to ``attempts`` times, the first
    after ``delay`` seconds, each next one after twice as long (at most ``max_delay``); the
    count starts again once frames come. :attr:`reconnects` counts the reopenings that worked;
    :attr:`gave_up` says that the attempts ran out.
    """

    def __init__(
        self,
        reader: VideoReader,
        open_reader: Callable[[], VideoReader],
        timeline: Timeline,
        attempts: int,
        delay: float,
        max_delay: float,
    ) -> None:
        self.reader = reader  # the one being read now
        self._open_reader = open_reader
        self._timeline = timeline
        self._attempts = attempts
        self._delay = delay
        self._max_delay = max_delay
        self._listening = urlparse(reader.path).scheme.lower() in _LISTENING
        self._stopped = threading.Event()
        self.reconnecting = False  # between an outage and the next frame: not a stall
        self.reconnects = 0
        self.gave_up = False

    @property
    def timed_out(self) -> bool:
        """Return whether the input ended because no data came for the read timeout."""
        return self.reader.timed_out

    def frames(
        self, start: float | None, end: float | None, max_frames: int | None
    ) -> Iterator[Frame]:
        """Yield the frames of the window, across reopenings, on the timeline's clock."""
        yielded = 0
        while not self._stopped.is_set():
            left = None if max_frames is None else max_frames - yielded
            for frame in self._timeline.frames(self.reader.frames(start, end, left)):
                self.reconnecting = False
                yield frame
                yielded += 1
            if self.reader.window_ended or self._stopped.is_set() or not self._reopen():
                return

    def _reopen(self) -> bool:
        """Open the input again; return whether it worked before the attempts ran out."""
        if self._attempts == 0:
            return False
        self.reconnecting = True
        path = self.reader.path
        why = "sent nothing for the read timeout" if self.reader.timed_out else "ended"
        log.warning("%s %s; reconnecting (at most %d attempts)", path, why, self._attempts)
        self.reader.close()
        for attempt in range(1, self._attempts + 1):
            wait = 0.0 if self._listening else self._delay * 2 ** (attempt - 1)
            if self._stopped.wait(min(wait, self._max_delay)):
                return False
            try:
                reader = self._open_reader()
            except ScoreCamError as err:
                log.warning("reconnect attempt %d of %d: %s", attempt, self._attempts, err)
                continue
            if self._stopped.is_set():  # stopped while it opened: nobody would close it
                reader.close()
                return False
            self.reader = reader
            self.reconnects += 1
            log.warning("%s: reconnected (%d so far)", path, self.reconnects)
            if not self._listening:
                self._timeline.mark()
            return True
        log.warning("%s: no reconnect attempt worked; the input has ended", path)
        self.gave_up = True
        return False

    def stop(self) -> None:
        """Stop reconnecting (a wait between attempts ends at once)."""
        self._stopped.set()

    def close(self) -> None:
        """Close the input being read (the first one is its opener's to close)."""
        self.stop()
        self.reader.close()
