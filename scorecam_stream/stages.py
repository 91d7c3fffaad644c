"""The pipeline's threads: a bounded hand-over between threads, and the render -> encode stage.

PyAV, OpenCV and torch release the GIL, so decoding, explaining and encoding overlap.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import av
import numpy as np

from .config import Config
from .fit import fit_to
from .outputs import Outputs, PreviewSampler
from .render import ColourCache, RenderOptions, render_frame
from .video import Frame, VideoReader, VideoWriter, write_image

log = logging.getLogger(__name__)

T = TypeVar("T")
QUEUE_FRAMES = 8  # decoded frames waiting for the explainer, rendered frames for the encoder
_POLL_S = 0.1  # how often a blocked hand-over looks whether the other side stopped or failed


class Handoff(Generic[T]):
    """A bounded queue between two threads that either side can close; errors travel along.

    ``put`` blocks while full (returns False once the hand-over is closed); iterating yields
    items until the producer calls :meth:`end` (or either side :meth:`close` s it), and raises
    the producer's error if it sent one.
    """

    _END = object()

    def __init__(self, size: int = QUEUE_FRAMES) -> None:
        self._queue: queue.Queue = queue.Queue(size)
        self._closed = threading.Event()
        self.producer: threading.Thread | None = None  # joined by close()

    def put(self, item: T) -> bool:
        """Hand ``item`` over; return False if the consumer closed the hand-over."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def end(self, error: BaseException | None = None) -> None:
        """Tell the consumer no more items come (after ``error``, if given)."""
        self.put(error if error is not None else self._END)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop both sides: puts return False, iteration ends; wait briefly for the producer."""
        self._closed.set()
        if self.producer is not None and self.producer is not threading.current_thread():
            self.producer.join(timeout=5)

    def __iter__(self) -> Iterator[T]:
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._closed.is_set():
                    return
                continue
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def produce(source: Iterable[T], name: str, size: int = QUEUE_FRAMES) -> Handoff[T]:
    """Return a hand-over fed from ``source`` by a daemon thread (its errors re-raised on read)."""
    handoff: Handoff[T] = Handoff(size)

    def run() -> None:
        try:
            for item in source:
                if not handoff.put(item):
                    return
            handoff.end()
        except BaseException as err:  # handed to the consumer, raised there
            handoff.end(err)

    handoff.producer = threading.Thread(target=run, daemon=True, name=name)
    handoff.producer.start()
    return handoff


_NO_HEAT = np.zeros((1, 1), np.float32)  # drawn at alpha 0 before the first map


@dataclass(frozen=True)
class DrawItem:
    """One frame to render: its map in [0, 1] (None: no map yet) and its label."""

    frame: Frame
    heat: np.ndarray | None
    label: str


class Encoder:
    """Renders and encodes, in a thread, the :class:`DrawItem` s of an iterable, in order.

    Every frame is drawn at ``size`` (width, height; default: the first frame's), scaled as
    the render options' ``fit`` says when it has another size. When ``speed_up`` is set (a
    live source's frames pile up), the writer takes a faster x264 preset, if it has one.

    ``open_writer(image)`` opens the video writer at the first rendered image (its size is
    known then); with ``image`` (path, name) the frame is written as a still image instead.
    :meth:`finish` waits, muxes the trailing audio, closes the output and raises the thread's
    error; :meth:`abort` stops without flushing.
    """

    def __init__(
        self,
        items: Iterable[DrawItem],
        options: RenderOptions,
        open_writer: Callable[[np.ndarray], VideoWriter] | None,
        image: tuple[Path, str] | None = None,
        preview: PreviewSampler | None = None,
        size: tuple[int, int] | None = None,
        speed_up: threading.Event | None = None,
    ) -> None:
        self._items = items
        self._speed_up = speed_up
        self._size = size  # (width, height) of the output; None: the first frame's
        self._options = options
        self._no_map = RenderOptions(
            layout=options.layout, colormap=options.colormap, alpha=0.0, colorbar=False
        )
        self._colours = ColourCache()  # a live output draws one map over many frames
        self._open_writer = open_writer
        self._image = image  # (path to write, real name) of a still image output
        self._preview = preview
        self._writer: VideoWriter | None = None
        self._sizes: tuple[tuple[int, int], tuple[int, int]] | None = None  # (output, latest)
        self._error: BaseException | None = None
        self._aborted = threading.Event()
        self.frames = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="encode")
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._items:
                if self._aborted.is_set():
                    return
                self._write(item)
        except BaseException as err:
            self._error = err
            if isinstance(self._items, Handoff):
                self._items.close()  # the producer's next put returns False instead of blocking

    def _picture(self, picture: np.ndarray) -> np.ndarray:
        """Return ``picture`` at the output's size (a source may change size mid-stream)."""
        size = picture.shape[:2]
        if self._sizes is None:
            height_width = (self._size[1], self._size[0]) if self._size else size
            self._sizes = (height_width, size)
        out, latest = self._sizes
        if size != latest:
            log.warning(
                "the input's frames are now %dx%d; scaling them to the output's %dx%d (--fit %s)",
                size[1],
                size[0],
                out[1],
                out[0],
                self._options.fit,
            )
        self._sizes = (out, size)
        return fit_to(picture, *out, self._options.fit)

    def _write(self, item: DrawItem) -> None:
        frame = item.frame
        picture = self._picture(frame.image)
        if item.heat is None:  # no map yet (live mode): the frame as it is, with its label
            image = render_frame(picture, _NO_HEAT, item.label, self._no_map, self._colours)
        else:
            image = render_frame(picture, item.heat, item.label, self._options, self._colours)
        if self._preview is not None:
            self._preview.offer(image)
        self.frames += 1
        if self._image is not None:
            write_image(str(self._image[0]), image, name=self._image[1])
            return
        if self._open_writer is None:
            return
        if self._writer is None:
            self._writer = self._open_writer(image)
        if self._speed_up is not None and self._speed_up.is_set():
            self._speed_up.clear()
            preset = self._writer.speed_up()
            if preset is not None:
                log.warning("the encoder falls behind the source: x264 preset %s now", preset)
            else:
                log.info(
                    "the encoder falls behind the source; %s has no faster preset",
                    self._writer.name,
                )
        self._writer.write(image, frame.pts, frame.time_base, frame.audio)

    def alive(self) -> bool:
        """Return whether the thread still runs; raise its error if it failed."""
        if self._error is not None:
            raise self._error
        return self._thread.is_alive()

    def finish(self, trailing_audio: Iterable[av.Packet] = ()) -> None:
        """Wait for the items to end, mux ``trailing_audio``, close the output; raise errors."""
        self._thread.join()
        if self._error is not None:
            self.abort()
            raise self._error
        if self._writer is not None:
            self._writer.add_audio(trailing_audio)
            self._writer.close()

    def abort(self) -> None:
        """Stop without flushing (a file output is discarded by the caller)."""
        self._aborted.set()
        self._thread.join(timeout=10)
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.abort()


def render_options(config: Config) -> RenderOptions:
    """Return how maps are drawn in this run."""
    out = config.output
    return RenderOptions(
        layout=out.layout, colormap=out.colormap, alpha=out.alpha, fit=config.model.fit
    )


def open_writer(
    config: Config, reader: VideoReader, path: Path | str, name: str
) -> Callable[[np.ndarray], VideoWriter]:
    """Return a function that opens the video writer for the first rendered image."""
    info, w, out = reader.info, config.window, config.output

    def opener(image: np.ndarray) -> VideoWriter:
        audio_end = w.end
        if w.max_frames is not None:
            # Audio stops with the last frame: the window's start plus max_frames at the rate.
            cap = (w.start or info.start_time) + w.max_frames / info.fps
            audio_end = cap if audio_end is None else min(audio_end, cap)
        return VideoWriter(
            str(path),
            image.shape[1],
            image.shape[0],
            info.time_base,
            info.fps,
            crf=out.crf,
            audio=reader.audio_stream,
            audio_start=w.start,
            audio_end=audio_end,
            time_offset=w.start or 0.0,
            hls_time=out.hls_time,
            hls_list_size=out.hls_list_size,
            name=name,
            encoder=out.encoder,
            realtime=reader.live,
        )

    return opener


def make_encoder(
    config: Config,
    reader: VideoReader,
    items: Handoff[DrawItem] | Iterator[DrawItem],
    outputs: Outputs,
    speed_up: threading.Event | None = None,
) -> Encoder:
    """Return the render -> encode thread of a run, writing to ``outputs.video``.

    ``speed_up``: set when the encoder falls behind a live source (see :class:`Encoder`).
    """
    path, name = outputs.video, outputs.video_name
    return Encoder(
        items,
        render_options(config),
        open_writer(config, reader, path, name) if path is not None and not outputs.image else None,
        image=(Path(path), name) if path is not None and outputs.image else None,
        preview=outputs.preview,
        size=config.output.output_size,
        speed_up=speed_up,
    )
