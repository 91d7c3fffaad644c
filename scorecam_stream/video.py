"""Video input and output with PyAV: probe, decode upright RGB frames, encode H.264 with audio.

Timing is never rebuilt from frame indices: every decoded :class:`Frame` carries its ``pts`` and
``time_base``, and :class:`VideoWriter` encodes each picture at the ``pts`` it is given, so
variable frame rate survives a round trip. Mistakes a user can cause (missing or unreadable
input, existing output) raise :class:`~scorecam_stream.errors.ScoreCamError` with a one-line
message; a stream that breaks off part-way is read up to the break with a logged warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.container
import numpy as np

from .config import check_window
from .errors import ScoreCamError

log = logging.getLogger(__name__)

DEFAULT_FPS = 25.0  # assumed when a container states no frame rate at all
URL_TIMEOUT_S = 30.0  # open and read timeout for network inputs, so a dead stream cannot hang
MAX_BAD_PACKETS = 25  # consecutive undecodable packets after which reading gives up
OUTPUT_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
IMAGE_CODECS = {
    ".png": ("png", "rgb24"),
    ".jpg": ("mjpeg", "yuvj420p"),
    ".jpeg": ("mjpeg", "yuvj420p"),
}
AUDIO_FALLBACK_CODEC = "aac"
# Audio codecs copied into mp4 as they are. FFmpeg would also put PCM or Vorbis in an mp4, but
# few players play that, so those are re-encoded; mov and mkv take whatever FFmpeg accepts.
MP4_AUDIO_COPY = frozenset({"aac", "mp3", "opus", "alac", "flac", "ac3", "eac3"})


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns about an input's first video stream."""

    path: str  # as given (file path or URL)
    width: int  # display width after rotation
    height: int  # display height after rotation
    rotation: int  # counter-clockwise degrees (0/90/180/270) that turn a decoded picture upright
    fps: float  # average frame rate (DEFAULT_FPS if the container lacks one)
    time_base: Fraction  # video stream time base
    frame_count: int | None  # from the container; None when unknown (streams, mkv)
    duration: float | None  # seconds; None when unknown
    has_audio: bool
    is_image: bool  # a still image (jpg/png/bmp/webp...), a single frame
    start_time: float = 0.0  # seconds of the stream's first timestamp (MPEG-TS often > 0)


@dataclass(frozen=True, eq=False)
class Frame:
    """One decoded picture, upright, with the timing it was decoded with."""

    index: int  # 0-based among frames yielded
    image: np.ndarray  # (H, W, 3) uint8 RGB, already rotated upright
    pts: int | None  # presentation timestamp in time_base units, as decoded
    time_base: Fraction
    seconds: float  # pts * time_base; (position in the stream) / fps when pts is None


def _is_url(path: str) -> bool:
    return "://" in path


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _reason(exc: BaseException) -> str:
    """Return FFmpeg's or the OS's one-line reason for ``exc``, without the errno."""
    return _one_line(getattr(exc, "strerror", None) or exc)


def _open_error(path: str, exc: Exception) -> ScoreCamError:
    """Return a one-line ScoreCamError for a failed ``av.open`` of ``path``."""
    if isinstance(exc, av.error.InvalidDataError):
        reason = "not a video or image FFmpeg can read, or the file is truncated or corrupt"
    else:
        reason = _reason(exc)
    return ScoreCamError(f"cannot read {path}: {reason}")


def _open_container(path: str) -> av.container.InputContainer:
    """Return an open input container; files are checked first, URLs go to FFmpeg as-is."""
    if not _is_url(path):
        file = Path(path)
        if not file.exists():
            raise ScoreCamError(f"input not found: {path}")
        if not file.is_file():
            raise ScoreCamError(f"input is not a file: {path}")
        if file.stat().st_size == 0:
            raise ScoreCamError(f"input is empty (0 bytes): {path}")
    try:
        if _is_url(path):
            return av.open(path, mode="r", timeout=URL_TIMEOUT_S)
        return av.open(path, mode="r")
    except (av.FFmpegError, OSError) as exc:
        raise _open_error(path, exc) from exc


def _open_input(path: str) -> av.container.InputContainer:
    """Return an open input container that has a video stream."""
    container = _open_container(path)
    if not container.streams.video:
        container.close()
        raise ScoreCamError(f"{path} has no video stream")
    return container


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


def _first_frame(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: str
) -> av.VideoFrame:
    """Return the first decodable video frame, or raise ScoreCamError."""
    try:
        for frame in container.decode(stream):
            return frame
    except av.FFmpegError as exc:
        raise ScoreCamError(
            f"cannot decode video from {path}: {_reason(exc)} (truncated or corrupt file?)"
        ) from exc
    raise ScoreCamError(f"{path} has no decodable video frames")


def probe(path: str) -> VideoInfo:
    """Return the size, rotation, rate, timing and audio presence of ``path``'s video.

    The first frame is decoded, because the rotation lives in per-frame side data and
    because an input whose first frame cannot be decoded is as good as unreadable.
    """
    with _open_input(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        is_image = _is_image(container)
        first = _first_frame(container, stream, path)
        rotation = _rotation(first, stream)
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        time_base = stream.time_base or Fraction(1, round(DEFAULT_FPS))
        if is_image:
            frame_count: int | None = 1
        else:
            frame_count = stream.frames or None
        if stream.duration is not None and stream.duration > 0:
            duration: float | None = float(stream.duration * time_base)
        elif container.duration is not None and container.duration > 0 and not is_image:
            duration = container.duration / av.time_base
        else:
            duration = None
        start_time = float(stream.start_time * time_base) if stream.start_time else 0.0
        return VideoInfo(
            path=path,
            width=width,
            height=height,
            rotation=rotation,
            fps=_fps(stream),
            time_base=Fraction(time_base),
            frame_count=frame_count,
            duration=duration,
            has_audio=bool(container.streams.audio),
            is_image=is_image,
            start_time=start_time,
        )


def read_frames(
    path: str,
    start: float | None = None,
    end: float | None = None,
    max_frames: int | None = None,
) -> Iterator[Frame]:
    """Yield upright RGB frames of ``path`` with ``start <= seconds < end``, at most ``max_frames``.

    ``start``/``end`` are on the same clock as :attr:`Frame.seconds` (``pts * time_base``).
    Files are sought to the keyframe before ``start``; earlier frames are decoded and dropped.
    For a still image ``start``/``end`` are ignored. A stream that breaks off or holds
    undecodable data is read as far as it decodes, with one warning logged, and never raises.
    """
    check_window(start, end, max_frames)  # the configuration's rule
    if not _is_url(path):
        # Fail on a missing, empty or unreadable file now, not at the first next().
        _open_input(path).close()
    return _read_frames(path, start, end, max_frames)


def _read_frames(
    path: str, start: float | None, end: float | None, max_frames: int | None
) -> Iterator[Frame]:
    with _open_input(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if _is_image(container):
            if start is not None or end is not None:
                log.info("%s is a still image; ignoring start/end", path)
            start = end = None
        elif start is not None and start > 0 and not _is_url(path):
            try:
                container.seek(int(start / stream.time_base), stream=stream)
            except av.FFmpegError as exc:
                log.warning(
                    "%s: cannot seek to %.3f s (%s); decoding from the start", path, start, exc
                )
        yield from _decode(container, stream, path, start, end, max_frames)


def _decode(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    path: str,
    start: float | None,
    end: float | None,
    max_frames: int | None,
) -> Iterator[Frame]:
    """Yield the frames in the window; log one warning at the end if the stream was damaged.

    Like the ffmpeg tool, a packet that fails to decode is skipped (after MAX_BAD_PACKETS in
    a row, reading stops); a read error ends the stream. Concealed (corrupt) frames are kept.
    """
    fps = _fps(stream)
    yielded = decoded = 0
    damage = {"packets flagged corrupt": 0, "undecodable packets": 0, "corrupt frames": 0}
    stopped_by = ""
    try:
        packets = container.demux(stream)
        consecutive_bad = 0
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.FFmpegError as exc:
                stopped_by = f"reading stopped: {_reason(exc)}; "
                break
            damage["packets flagged corrupt"] += packet.is_corrupt
            try:
                av_frames = packet.decode()
            except av.FFmpegError as exc:
                damage["undecodable packets"] += 1
                consecutive_bad += 1
                log.debug("%s: undecodable packet at pts %s: %s", path, packet.pts, exc)
                if consecutive_bad >= MAX_BAD_PACKETS:
                    stopped_by = f"gave up after {consecutive_bad} undecodable packets; "
                    break
                continue
            consecutive_bad = 0
            for av_frame in av_frames:
                decoded += 1
                damage["corrupt frames"] += av_frame.is_corrupt
                pts = av_frame.pts
                time_base = av_frame.time_base or stream.time_base
                seconds = float(pts * time_base) if pts is not None else (decoded - 1) / fps
                if start is not None and seconds < start:
                    continue
                if end is not None and seconds >= end:
                    return
                image = av_frame.to_ndarray(format="rgb24")
                image = rotate_upright(image, _rotation(av_frame, stream))
                yield Frame(yielded, image, pts, Fraction(time_base), seconds)
                yielded += 1
                if max_frames is not None and yielded >= max_frames:
                    return
    finally:
        if stopped_by or any(damage.values()):
            found = ", ".join(f"{count} {what}" for what, count in damage.items() if count)
            log.warning(
                "%s is damaged or cut short (%s%s); kept the %d frame(s) that decoded",
                path,
                stopped_by,
                found or "no further detail",
                yielded,
            )


def _even(size: int) -> int:
    return size + size % 2


def _as_rate(fps: float) -> Fraction:
    # 29.97 -> 2997/100, 30000/1001 stays 30000/1001: an exact, small fraction for the header.
    return Fraction(fps).limit_denominator(1001)


class _AudioTrack:
    """Audio from an input file, muxed into an output by copying packets or re-encoding to AAC."""

    def __init__(
        self,
        source: str,
        container: av.container.InputContainer,
        output: av.container.OutputContainer,
        start: float | None,
        end: float | None,
        offset: float,
    ) -> None:
        self._input = container
        self._in_stream = container.streams.audio[0]
        self._start = start if start is not None else (offset if offset > 0 else None)
        self._end = end
        self._offset = offset
        self._offset_units = round(offset / self._in_stream.time_base)
        self._reencode = (
            output.format.name == "mp4" and self._in_stream.codec_context.name not in MP4_AUDIO_COPY
        )
        if not self._reencode:
            try:
                self._out_stream = output.add_stream_from_template(self._in_stream)
            except ValueError:  # the output container cannot hold this codec
                self._reencode = True
        if self._reencode:
            self._out_stream = self._add_encoder(output)
        log.debug(
            "audio from %s: %s %s",
            source,
            "re-encoding to" if self._reencode else "copying",
            self._out_stream.codec_context.name,
        )
        self._output = output
        if start is not None and start > 0 and not _is_url(source):
            with contextlib.suppress(av.FFmpegError):
                self._input.seek(int(start / self._in_stream.time_base), stream=self._in_stream)
        self._packets = self._input.demux(self._in_stream)
        self._pending: tuple[av.Packet, float] | None = None
        self._done = False

    def _add_encoder(self, output: av.container.OutputContainer) -> av.AudioStream:
        rates = av.codec.Codec(AUDIO_FALLBACK_CODEC, "w").audio_rates or ()
        rate = self._in_stream.rate if self._in_stream.rate in rates else 48000
        stream = output.add_stream(AUDIO_FALLBACK_CODEC, rate=rate)
        stream.layout = "mono" if self._in_stream.channels == 1 else "stereo"
        return stream

    @staticmethod
    def open(
        source: str,
        output: av.container.OutputContainer,
        start: float | None,
        end: float | None,
        offset: float,
    ) -> _AudioTrack | None:
        """Return an audio track for ``source``, or None when it has no audio stream."""
        container = _open_container(source)
        if not container.streams.audio:
            container.close()
            log.info("%s has no audio stream; the output will be silent", source)
            return None
        try:
            return _AudioTrack(source, container, output, start, end, offset)
        except BaseException:
            container.close()
            raise

    def _next_packet(self) -> tuple[av.Packet, float] | None:
        """Return the next packet in the window and its input time in seconds; None at the end."""
        while True:
            try:
                packet = next(self._packets)
            except StopIteration:
                return None
            except av.FFmpegError as exc:
                log.warning("audio source broke off (%s); the audio ends early", _reason(exc))
                return None
            timestamp = packet.pts if packet.pts is not None else packet.dts
            if timestamp is None:  # the demuxer's final empty packet
                continue
            seconds = float(timestamp * packet.time_base)
            if self._start is not None and seconds < self._start:
                continue
            if self._end is not None and seconds >= self._end:
                return None
            return packet, seconds

    def pump(self, until: float | None) -> None:
        """Mux the audio whose output time is at most ``until`` seconds (None: all the rest)."""
        while not self._done:
            if self._pending is None:
                self._pending = self._next_packet()
                if self._pending is None:
                    self._done = True
                    break
            packet, seconds = self._pending
            if until is not None and seconds - self._offset > until:
                return
            self._pending = None
            self._mux(packet)

    def _mux(self, packet: av.Packet) -> None:
        if not self._reencode:
            if packet.pts is not None:
                packet.pts -= self._offset_units
            if packet.dts is not None:
                packet.dts -= self._offset_units
            packet.stream = self._out_stream
            self._output.mux(packet)
            return
        try:
            frames = packet.decode()
        except av.FFmpegError as exc:
            log.debug("skipping an undecodable audio packet: %s", exc)
            return
        self._encode(frames)

    def _encode(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            if frame.pts is not None:
                frame.pts -= self._offset_units
            self._output.mux(self._out_stream.encode(frame))

    def finish(self) -> None:
        """Mux the rest of the window; when re-encoding, flush the decoder and the encoder."""
        self.pump(None)
        if self._reencode:
            with contextlib.suppress(av.FFmpegError):
                self._encode(self._in_stream.codec_context.decode(None))
            self._output.mux(self._out_stream.encode(None))

    def close(self) -> None:
        self._input.close()


class VideoWriter:
    """Writes RGB frames as H.264 (libx264, yuv420p) into mp4/m4v/mov/mkv, chosen by extension.

    Each frame is encoded at the ``pts`` it is given, so the output keeps the input's frame
    count and timestamps (variable frame rate included). Odd sizes are padded by one pixel
    (edge replicated), since yuv420p needs even dimensions.

    Audio: with ``audio_from``, its first audio stream is copied packet by packet when the
    output container accepts the codec (aac/mp3/opus/... in mp4), else decoded and re-encoded
    to AAC. Only packets with ``audio_start <= time < audio_end`` are kept. ``time_offset``
    (seconds) is subtracted from every video *and* audio timestamp, so a clip cut at ``start``
    can begin at 0 by passing ``time_offset=start``; with the default 0, video pts are written
    exactly as given and audio keeps its input timestamps, which keeps the two in sync.
    Use as a context manager: a normal exit flushes and closes, an exception just closes.
    """

    def __init__(
        self,
        path: str,
        width: int,
        height: int,
        time_base: Fraction,
        fps: float,
        crf: int = 20,
        audio_from: str | None = None,
        audio_start: float | None = None,
        audio_end: float | None = None,
        time_offset: float = 0.0,
    ) -> None:
        container_format = OUTPUT_FORMATS.get(Path(path).suffix.lower())
        if container_format is None:
            raise ScoreCamError(
                f"cannot write {path}: the output must end with one of {', '.join(OUTPUT_FORMATS)}"
            )
        if width <= 0 or height <= 0:
            raise ScoreCamError(f"invalid output size {width}x{height}")
        if not fps > 0:
            raise ScoreCamError(f"invalid frame rate {fps}")
        if not 0 <= crf <= 51:
            raise ScoreCamError(f"crf must be between 0 and 51, got {crf}")
        self.path = str(path)
        self.width = width
        self.height = height
        self._time_base = Fraction(time_base)
        self._offset_units = round(Fraction(time_offset) / self._time_base)
        self._step = max(1, round(1 / (Fraction(fps) * self._time_base)))
        self._last_pts: int | None = None
        self._frames = 0
        self._warned_pts = False
        self._closed = False
        self._audio: _AudioTrack | None = None
        options = {"movflags": "+faststart"} if container_format in ("mp4", "mov") else {}
        try:
            self._output = av.open(
                self.path, "w", format=container_format, container_options=options
            )
        except (av.FFmpegError, OSError) as exc:
            raise ScoreCamError(f"cannot write {path}: {_reason(exc)}") from exc
        try:
            # B-frames are off: with them, a variable-rate mp4 gets a track duration shorter
            # than its last timestamp (dts lag behind pts unevenly).
            self._stream = self._output.add_stream(
                "libx264",
                rate=_as_rate(fps),
                time_base=self._time_base,
                width=_even(width),
                height=_even(height),
                pix_fmt="yuv420p",
                options={"crf": str(crf), "bf": "0"},
            )
            if audio_from is not None:
                self._audio = _AudioTrack.open(
                    audio_from, self._output, audio_start, audio_end, time_offset
                )
        except BaseException:
            self._output.close()
            raise

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def _next_pts(self, pts: int | None, time_base: Fraction) -> int:
        """Return ``pts`` in the output time base, shifted, and strictly after the last one."""
        if pts is None:
            out = 0 if self._last_pts is None else self._last_pts + self._step
        else:
            if time_base != self._time_base:
                pts = round(pts * Fraction(time_base) / self._time_base)
            out = pts - self._offset_units
        if self._last_pts is not None and out <= self._last_pts:
            if not self._warned_pts:
                log.warning("%s: timestamps not increasing at pts %d; nudging them", self.path, out)
                self._warned_pts = True
            out = self._last_pts + 1
        return out

    def write(self, image: np.ndarray, pts: int | None, time_base: Fraction) -> None:
        """Encode one (height, width, 3) uint8 RGB picture at ``pts`` (in ``time_base`` units)."""
        if self._closed:
            raise RuntimeError("VideoWriter is closed")
        if image.shape != (self.height, self.width, 3) or image.dtype != np.uint8:
            raise ScoreCamError(
                f"frame of shape {image.shape} ({image.dtype}) does not fit the output's "
                f"{self.width}x{self.height} RGB uint8 (does the input change size mid-stream?)"
            )
        pad = ((0, self.height % 2), (0, self.width % 2), (0, 0))
        if any(after for _, after in pad):
            image = np.pad(image, pad, mode="edge")
        out_pts = self._next_pts(pts, time_base)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = out_pts
        frame.time_base = self._time_base
        try:
            self._output.mux(self._stream.encode(frame))
            if self._audio is not None:
                self._audio.pump(float(out_pts * self._time_base))
        except (av.FFmpegError, OSError) as exc:
            raise ScoreCamError(f"cannot write {self.path}: {_reason(exc)}") from exc
        self._last_pts = out_pts
        self._frames += 1

    def close(self) -> None:
        """Flush the encoder, mux the remaining audio and close the output."""
        if self._closed:
            return
        if self._frames == 0:
            self._abort()
            raise ScoreCamError(f"no frames to write to {self.path} (empty input or time window?)")
        try:
            self._output.mux(self._stream.encode(None))
            if self._audio is not None:
                self._audio.finish()
                self._audio.close()
            self._closed = True
            self._output.close()  # writes the index (moved to the front of an mp4)
        except (av.FFmpegError, OSError) as exc:
            self._abort()
            raise ScoreCamError(f"cannot write {self.path}: {_reason(exc)}") from exc

    def _abort(self) -> None:
        """Close everything without flushing; the caller discards the file."""
        self._closed = True
        for close in (self._audio.close if self._audio else None, self._output.close):
            if close is not None:
                try:
                    close()
                except (av.FFmpegError, OSError) as exc:
                    log.debug("ignoring an error while closing %s: %s", self.path, exc)


def write_image(path: str, image: np.ndarray) -> None:
    """Write a (H, W, 3) uint8 RGB picture as PNG or JPEG, chosen by the extension."""
    codec = IMAGE_CODECS.get(Path(path).suffix.lower())
    if codec is None:
        raise ScoreCamError(
            f"cannot write {path}: an image output must end with one of {', '.join(IMAGE_CODECS)}"
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    codec_name, pix_fmt = codec
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    try:
        # "update" makes the image2 muxer write this one file, never a numbered sequence.
        with av.open(str(path), "w", format="image2", container_options={"update": "1"}) as output:
            stream = output.add_stream(codec_name, pix_fmt=pix_fmt)
            stream.width, stream.height = frame.width, frame.height
            output.mux(stream.encode(frame.reformat(format=pix_fmt)))
            output.mux(stream.encode(None))
    except (av.FFmpegError, OSError) as exc:
        raise ScoreCamError(f"cannot write {path}: {_reason(exc)}") from exc


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same extension) that replaces ``path`` on success.

    On any exception (KeyboardInterrupt included) the temporary file is deleted and an
    existing file at ``path`` is left untouched.
    """
    target = Path(path)
    if target.is_dir():
        raise ScoreCamError(f"output {target} is a directory")
    if target.exists() and not overwrite:
        raise ScoreCamError(f"output {target} exists; pass --overwrite")
    parent = target.parent
    if not parent.is_dir():
        raise ScoreCamError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ScoreCamError(f"output directory {parent} is not writable")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=target.suffix, dir=parent)
    except OSError as exc:
        raise ScoreCamError(f"cannot create a file in {parent}: {_reason(exc)}") from exc
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        if not temporary.is_file() or temporary.stat().st_size == 0:
            raise ScoreCamError(f"nothing was written for {target}")
        try:
            existing = target.exists()
            os.chmod(
                temporary, stat.S_IMODE(target.stat().st_mode) if existing else _default_file_mode()
            )
            os.replace(temporary, target)
        except OSError as exc:
            raise ScoreCamError(f"cannot move the output into {target}: {_reason(exc)}") from exc
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
