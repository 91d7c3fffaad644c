"""Reading an input once: one PyAV session gives the stream info, the frames and the audio.

Timing is never rebuilt from frame indices: every decoded :class:`Frame` carries its ``pts`` and
``time_base``. Audio packets come from the same demux as the frames and travel with the frame
they were read before (:attr:`Frame.audio`), so a live source is read in one session and the
output's sound matches its pictures. Opening (and its one-line errors) is :mod:`.inputs`'s; a
stream that breaks off part-way is read up to the break with a logged warning.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Generator, Iterator, Mapping
from fractions import Fraction

import av
import av.container
import numpy as np

from ..config_checks import check_window
from ..errors import ScoreCamError
from .inputs import URL_TIMEOUT_S, is_live_source, open_input, reason
from .records import Frame, VideoInfo

log = logging.getLogger("scorecam_stream.video")

DEFAULT_FPS = 25.0  # assumed when a container states no frame rate at all
LIVE_READ_TIMEOUT_S = 10.0  # no data for this long: a live source has ended
MAX_BAD_PACKETS = 25  # consecutive undecodable packets after which reading gives up


def _is_image(container: av.container.InputContainer) -> bool:
    # FFmpeg reads single still images through "image2" or a "<codec>_pipe" demuxer.
    names = container.format.name.split(",")
    return any(name == "image2" or name.endswith("_pipe") for name in names)


def _fps(stream: av.video.stream.VideoStream) -> float:
    """Return the stream's average frame rate, falling back to guessed rates, then DEFAULT_FPS."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    log.debug("no frame rate in the container; assuming %s fps", DEFAULT_FPS)
    return DEFAULT_FPS


def _rotation(frame: av.VideoFrame, stream: av.video.stream.VideoStream) -> int:
    """Return the counter-clockwise degrees (0/90/180/270) that turn ``frame`` upright."""
    # FFmpeg >= 6 puts the display matrix on each decoded frame; PyAV reads it as a
    # counter-clockwise angle. Older FFmpeg exported a clockwise "rotate" stream tag instead.
    degrees = frame.rotation
    if degrees == 0:
        with contextlib.suppress(ValueError):
            degrees = -int(float(stream.metadata.get("rotate", 0)))
    return (round(degrees / 90) * 90) % 360


def rotate_upright(image: np.ndarray, rotation: int) -> np.ndarray:
    """Return ``image`` (H, W, C) turned counter-clockwise by ``rotation`` degrees (k * 90)."""
    quarter_turns = (rotation // 90) % 4
    if quarter_turns == 0:
        return image
    return np.ascontiguousarray(np.rot90(image, k=quarter_turns))


class VideoReader:
    """One session of an input: :attr:`info`, then :meth:`frames` with their audio.

    ``VideoReader(path, input_format=None, options=None, read_timeout=None)`` opens ``path``
    (a file, any URL FFmpeg reads, ``-`` for standard input, or a device with
    ``input_format="v4l2"``) once and decodes its first frame (rotation lives in per-frame side
    data, and an input whose first frame cannot be decoded is as good as unreadable).
    ``options`` are FFmpeg demuxer/protocol options (``rtsp_transport=tcp``). With
    ``read_timeout``, a read that waits longer than that ends the input (a live source that
    stopped sending). Use it as a context manager.
    """

    def __init__(
        self,
        path: str,
        input_format: str | None = None,
        options: Mapping[str, str] | None = None,
        read_timeout: float | None = None,
    ) -> None:
        self.path = path
        self.live = is_live_source(path, input_format)
        self.read_timeout = read_timeout
        self.trailing_audio: tuple[av.Packet, ...] = ()  # audio after the last frame yielded
        self.timed_out = False  # the last read waited longer than read_timeout
        self.window_ended = False  # frames() stopped at its window's end or max_frames
        self._detached = False
        self._container = open_input(path, input_format, options, read_timeout)
        try:
            if not self._container.streams.video:
                raise ScoreCamError(f"{path} has no video stream")
            self._stream = self._container.streams.video[0]
            self._stream.thread_type = "AUTO"
            audio = self._container.streams.audio
            self.audio_stream: av.AudioStream | None = audio[0] if audio else None
            self._is_image = _is_image(self._container)
            self._audio: list[av.Packet] = []
            self._lookahead: deque[av.VideoFrame] = deque()
            self._source = self._av_frames()
            first = next(self._source, None)
            if first is None:
                raise ScoreCamError(f"{path} has no decodable video frames")
            self._lookahead.append(first)
            self._started = False  # frames() has not run yet: the first frame is still ours
            self.info = self._info(first)
        except BaseException:
            self._container.close()
            raise

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the input (unless :meth:`detach` ed)."""
        if self._detached:
            return
        self._source.close()
        self._container.close()

    def detach(self) -> None:
        """Leave the input open for good: a thread is blocked in one of its reads."""
        self._detached = True

    def _info(self, first: av.VideoFrame) -> VideoInfo:
        stream, container = self._stream, self._container
        rotation = _rotation(first, stream)
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        time_base = stream.time_base or Fraction(1, round(DEFAULT_FPS))
        if stream.duration is not None and stream.duration > 0:
            duration: float | None = float(stream.duration * time_base)
        elif container.duration is not None and container.duration > 0 and not self._is_image:
            duration = container.duration / av.time_base
        else:
            duration = None
        return VideoInfo(
            path=self.path,
            width=width,
            height=height,
            rotation=rotation,
            fps=_fps(stream),
            time_base=Fraction(time_base),
            frame_count=1 if self._is_image else (stream.frames or None),
            duration=duration,
            has_audio=self.audio_stream is not None,
            is_image=self._is_image,
            start_time=float(stream.start_time * time_base) if stream.start_time else 0.0,
        )

    def frames(
        self,
        start: float | None = None,
        end: float | None = None,
        max_frames: int | None = None,
    ) -> Iterator[Frame]:
        """Yield upright RGB frames with ``start <= seconds < end``, at most ``max_frames``.

        ``start``/``end`` are on the clock of :attr:`Frame.seconds` (``pts * time_base``).
        A file is sought to the keyframe before ``start`` (and back to its beginning when
        ``frames`` is called again); earlier frames are decoded and dropped. A still image
        ignores the window. Each frame carries the audio packets read before it; the audio read
        after the last frame (up to one frame's time past it) is left in
        :attr:`trailing_audio`. A stream that breaks off or holds undecodable data is read as
        far as it decodes, with one warning logged, and never raises.
        """
        check_window(start, end, max_frames)
        if self._is_image:
            if start is not None or end is not None:
                log.info("%s is a still image; ignoring start/end", self.path)
            start = end = None
        if self._started or (start is not None and start > 0):
            self._seek(start or 0.0)
        self._started = True
        yielded = 0
        last: float | None = None
        for av_frame in self._decoded():
            pts = av_frame.pts
            time_base = av_frame.time_base or self._stream.time_base
            seconds = float(pts * time_base) if pts is not None else self._position / self.info.fps
            if start is not None and seconds < start:
                continue
            if end is not None and seconds >= end:
                self.window_ended = True
                break
            image = rotate_upright(
                av_frame.to_ndarray(format="rgb24"), _rotation(av_frame, self._stream)
            )
            audio, self._audio = tuple(self._audio), []
            yield Frame(yielded, image, pts, Fraction(time_base), seconds, audio, time.monotonic())
            yielded += 1
            last = seconds
            if max_frames is not None and yielded >= max_frames:
                self.window_ended = True
                break
        self._read_trailing_audio(end if last is None else last + 1 / self.info.fps)

    def _seek(self, seconds: float) -> None:
        """Go back to (the keyframe before) ``seconds``; files only."""
        if self.live:
            if self._started:
                raise ScoreCamError(f"{self.path} is a live source: it can be read only once")
            return  # a live source starts where it is
        self._lookahead.clear()
        self._audio = []
        self._source.close()
        try:
            self._container.seek(int(seconds / self._stream.time_base), stream=self._stream)
        except av.FFmpegError as exc:
            log.warning(
                "%s: cannot seek to %.3f s (%s); decoding from the start", self.path, seconds, exc
            )
        self._source = self._av_frames()

    def _decoded(self) -> Iterator[av.VideoFrame]:
        # Not ``yield from``: closing this generator (a consumer that stops early) must not
        # close the session's decoder, which frames() and the trailing audio read go on with.
        while True:
            if self._lookahead:
                yield self._lookahead.popleft()
            elif (av_frame := next(self._source, None)) is not None:
                yield av_frame
            else:
                return

    def _read_trailing_audio(self, until: float | None) -> None:
        """Keep the audio read after the last frame, reading on up to ``until`` (files only)."""
        if self.audio_stream is not None and not self.live:
            tb = self.audio_stream.time_base
            while until is None or not self._audio or _seconds(self._audio[-1], tb) < until:
                if self._lookahead:
                    self._lookahead.popleft()
                elif next(self._source, None) is None:
                    break
        self.trailing_audio, self._audio = tuple(self._audio), []

    def _av_frames(self) -> Generator[av.VideoFrame, None, None]:
        """Yield decoded video frames, keeping audio packets in ``self._audio``; warn at the end.

        Like the ffmpeg tool, a packet that fails to decode is skipped (after MAX_BAD_PACKETS in
        a row, reading stops); a read error ends the stream. Concealed (corrupt) frames are kept.
        """
        self._position = 0
        streams = [self._stream] + ([self.audio_stream] if self.audio_stream else [])
        damage = {"packets flagged corrupt": 0, "undecodable packets": 0, "corrupt frames": 0}
        stopped_by = ""
        decoded = 0
        try:
            packets = self._container.demux(streams)
            consecutive_bad = 0
            while True:
                try:
                    packet = next(packets)
                except StopIteration:
                    break
                except av.error.ExitError:
                    self.timed_out = True
                    log.warning(
                        "%s: no data for %g s; taking the input as ended",
                        self.path,
                        self.read_timeout or URL_TIMEOUT_S,
                    )
                    break
                except av.FFmpegError as exc:
                    stopped_by = f"reading stopped: {reason(exc)}; "
                    break
                if packet.stream.type == "audio":
                    if packet.pts is not None or packet.dts is not None:
                        self._audio.append(packet)
                    continue
                damage["packets flagged corrupt"] += packet.is_corrupt
                try:
                    av_frames = packet.decode()
                except av.FFmpegError as exc:
                    damage["undecodable packets"] += 1
                    consecutive_bad += 1
                    log.debug("%s: undecodable packet at pts %s: %s", self.path, packet.pts, exc)
                    if consecutive_bad >= MAX_BAD_PACKETS:
                        stopped_by = f"gave up after {consecutive_bad} undecodable packets; "
                        break
                    continue
                consecutive_bad = 0
                for av_frame in av_frames:
                    decoded += 1
                    self._position = decoded - 1
                    damage["corrupt frames"] += av_frame.is_corrupt
                    yield av_frame
        finally:
            if stopped_by or any(damage.values()):
                found = ", ".join(f"{count} {what}" for what, count in damage.items() if count)
                log.warning(
                    "%s is damaged or cut short (%s%s); kept the frames that decoded",
                    self.path,
                    stopped_by,
                    found or "no further detail",
                )


def _seconds(packet: av.Packet, time_base: Fraction) -> float:
    timestamp = packet.pts if packet.pts is not None else packet.dts
    return float(timestamp * time_base)


def probe(path: str) -> VideoInfo:
    """Return the size, rotation, rate, timing and audio presence of ``path``'s video."""
    with VideoReader(path) as reader:
        return reader.info


def read_frames(
    path: str,
    start: float | None = None,
    end: float | None = None,
    max_frames: int | None = None,
) -> Iterator[Frame]:
    """Yield the frames of ``path`` in a window (see :meth:`VideoReader.frames`).

    The input is opened now, so a missing or unreadable file fails here, not at the first
    ``next()``.
    """
    check_window(start, end, max_frames)
    reader = VideoReader(path)

    def frames() -> Iterator[Frame]:
        with reader:
            yield from reader.frames(start, end, max_frames)

    return frames()
