"""What the runs of many inputs share: the one explainer lent to every video's (or live
stream's) run at once, and the hand-over of their records to the calling thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

from ..records import FrameResult, FrameTask
from ..reuse import ReuseOptions
from ..workers import Explainer, LocalExplainer
from .records import VideoRecord

P = TypeVar("P")


class FairLock:
    """A lock granted in the order it was asked for (``threading.Lock`` promises no order).

    Videos, or live streams, that share one in-process model take its frames in turn: a thread
    that releases it and asks again waits behind the others.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0  # the next ticket handed out
        self._serving = 0  # the ticket that holds the lock

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()

    def __exit__(self, *_exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class SharedExplainer:
    """The batch's one explainer, lent to each video's run (the batch closes it at the end).

    ``serialize``: one call at a time, frame by frame, for an explainer whose worker is not
    thread-safe (the in-process :class:`~scorecam_stream.workers.LocalExplainer`); videos then
    take turns frame by frame, and their decoding and encoding still overlap. The Ray
    explainer serves concurrent runs itself (one ``explain`` per thread, the same workers).
    """

    def __init__(self, explainer: Explainer, serialize: bool) -> None:
        self.inner = explainer
        self.meta = explainer.meta
        self._lock = FairLock() if serialize else None

    def classify(self, xs: torch.Tensor) -> torch.Tensor:
        """Return logits (N, C) on CPU."""
        if self._lock is None:
            return self.inner.classify(xs)
        with self._lock:
            return self.inner.classify(xs)

    def explain(
        self, items: Iterable[tuple[P, FrameTask | None]], reuse: ReuseOptions | None = None
    ) -> Iterator[tuple[P, FrameResult | None]]:
        """Yield (payload, result) in the order of ``items`` (one video: one stream)."""
        if self._lock is None:
            yield from self.inner.explain(items, reuse)
            return
        assert isinstance(self.inner, LocalExplainer)  # the only one serialized
        state = self.inner.stream_state(reuse)  # this video's own
        for payload, task in items:
            if task is None:
                yield payload, None
                continue
            with self._lock:  # the frame is decoded outside the lock, explained inside it
                result = self.inner.explain_frame(task, state)
            yield payload, result

    def workers_up(self) -> int:
        """Return how many workers of the shared explainer take calls now."""
        return self.inner.workers_up()


def arrivals(
    results: queue.Queue[VideoRecord | BaseException], count: int
) -> Iterator[VideoRecord]:
    """Yield ``count`` records from the runs' threads as they come; raise a thread's exception.

    Waits with a timeout, so that Ctrl-C and SIGTERM (delivered to the main thread only) get
    through while the runs go on.
    """
    for _ in range(count):
        while True:
            try:
                item = results.get(timeout=0.2)
                break
            except queue.Empty:
                continue
        if isinstance(item, BaseException):
            raise item
        yield item
