"""Encoding the annotated frames: H.264 (or ``--encoder``) into a file, HLS or a live stream.

:class:`VideoWriter` encodes each picture at the ``pts`` it is given, so variable frame rate
survives a round trip. Outputs (:func:`output_kind`): files (mp4/m4v/mov/mkv), HLS
(``DIR/name.m3u8``: whole segments, the playlist closed on stop), and live streams (``udp://``,
``srt://``, ``tcp://`` as MPEG-TS, ``rtmp://`` as FLV, ``-`` as MPEG-TS on standard output),
which get low-latency H.264 and are paced by the frames' timestamps (a live source's frames
that queued while the run started go out at up to :data:`CATCH_UP` x real time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlparse

import av
import av.container
import numpy as np
from av.codec.context import Flags

from ..errors import ScoreCamError
from .audio import AudioTrack
from .encoders import DEFAULT_ENCODER, FASTER_PRESETS, encoder_options, pixel_format, usable_encoder
from .inputs import STDIN, is_url, reason

log = logging.getLogger("scorecam_stream.video")

OUTPUT_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
STREAM_FORMATS = {"udp": "mpegts", "srt": "mpegts", "tcp": "mpegts", "rtmp": "flv", "rtmps": "flv"}
HLS_SUFFIX = ".m3u8"
CATCH_UP = 2.0  # a live output written from a live source: at most this many x real time


def output_kind(target: str) -> str:
    """Return "file", "hls" or "stream" for an output path or URL; raise for anything else."""
    if target == STDIN or (is_url(target) and urlparse(target).scheme.lower() in STREAM_FORMATS):
        return "stream"
    if is_url(target):
        raise ScoreCamError(
            f"cannot stream to {target}: use udp://, srt://, tcp://, rtmp://, - or a .m3u8 file"
        )
    suffix = Path(target).suffix.lower()
    if suffix == HLS_SUFFIX:
        return "hls"
    if suffix in OUTPUT_FORMATS:
        return "file"
    allowed = ", ".join([*OUTPUT_FORMATS, HLS_SUFFIX])
    raise ScoreCamError(f"cannot write {target}: a video output must end with one of {allowed}")


def _even(size: int) -> int:
    return size + size % 2


def _as_rate(fps: float) -> Fraction:
    # 29.97 -> 2997/100, 30000/1001 stays 30000/1001: an exact, small fraction for the header.
    return Fraction(fps).limit_denominator(1001)


def _open_output(
    target: str, name: str, kind: str, hls_time: float, hls_list_size: int
) -> av.container.OutputContainer:
    if kind == "file":
        fmt = OUTPUT_FORMATS[Path(name).suffix.lower()]
        options = {"movflags": "+faststart"} if fmt in ("mp4", "mov") else {}
        return av.open(target, "w", format=fmt, container_options=options)
    if kind == "hls":
        options = {
            "hls_time": f"{hls_time:g}",
            "hls_list_size": str(hls_list_size),
            # Segments are written under a temporary name and renamed when whole; the ones
            # that fell off the playlist are deleted, so disk use stays flat on a long stream.
            "hls_flags": "temp_file+delete_segments",
        }
        return av.open(target, "w", format="hls", container_options=options)
    if target == STDIN:
        return av.open("pipe:1", "w", format="mpegts")
    return av.open(target, "w", format=STREAM_FORMATS[urlparse(target).scheme.lower()])


class VideoWriter:
    """Writes RGB frames as H.264 (libx264, yuv420p) to a file, an HLS playlist or a stream.

    Each frame is encoded at the ``pts`` it is given, so the output keeps the input's frame
    count and timestamps (variable frame rate included). Odd sizes are padded by one pixel
    (edge replicated), since yuv420p needs even dimensions.

    Audio: with ``audio`` (the input's audio stream), the packets given to :meth:`write` and
    :meth:`add_audio` are copied when the output container accepts the codec (aac/mp3/opus/...
    in mp4), else decoded and re-encoded to AAC. Only packets with ``audio_start <= time <
    audio_end`` are kept. ``time_offset`` (seconds) is subtracted from every video *and* audio
    timestamp, so a clip cut at ``start`` can begin at 0 by passing ``time_offset=start``.

    HLS and stream outputs get zero-latency H.264 with a keyframe about every second, and
    frames are sent no faster than their timestamps (a file read as fast as it decodes still
    plays at its own pace for the receiver). Use as a context manager: a normal exit flushes
    and closes, an exception closes without flushing (an HLS playlist is closed either way).
    """

    def __init__(
        self,
        path: str,
        width: int,
        height: int,
        time_base: Fraction,
        fps: float,
        crf: int = 20,
        audio: av.AudioStream | None = None,
        audio_start: float | None = None,
        audio_end: float | None = None,
        time_offset: float = 0.0,
        hls_time: float = 2.0,
        hls_list_size: int = 6,
        name: str | None = None,
        encoder: str = DEFAULT_ENCODER,
        realtime: bool = False,
    ) -> None:
        # ``name``: the output's real name when ``path`` is a temporary (see atomic_output).
        # ``realtime``: frames come at a live source's pace, so x264 takes a fast preset, and a
        # live output catches up with what queued while the run started, at CATCH_UP x real
        # time (pacing a live source's frames at 1x would keep that lag, and the queue, for good).
        self.name = str(name or path)
        self.kind = output_kind(self.name)
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
        self._paced_from: tuple[float, float] | None = None  # (wall clock, seconds) of frame 0
        self._pace_speed = CATCH_UP if realtime else 1.0
        self._encoder: av.VideoCodecContext | None = None  # a faster one, after speed_up()
        self._audio: AudioTrack | None = None
        try:
            self._output = _open_output(self.path, self.name, self.kind, hls_time, hls_list_size)
        except (av.FFmpegError, OSError) as exc:
            raise ScoreCamError(f"cannot write {path}: {reason(exc)}") from exc
        try:
            options = encoder_options(encoder, crf, fps, self.live, realtime)
            size = (_even(width), _even(height))
            self.encoder = usable_encoder(encoder, *size, _as_rate(fps), self._time_base, options)
            if self.encoder != encoder:
                options = encoder_options(self.encoder, crf, fps, self.live, realtime)
            self._options = options
            self.preset = options.get("preset", "medium")  # x264's default
            self._stream = self._output.add_stream(
                self.encoder,
                rate=_as_rate(fps),
                time_base=self._time_base,
                width=_even(width),
                height=_even(height),
                pix_fmt=pixel_format(self.encoder),
                options=options,
            )
            if audio is not None:
                self._audio = AudioTrack(audio, self._output, audio_start, audio_end, time_offset)
        except BaseException:
            self._output.close()
            raise

    @property
    def live(self) -> bool:
        """Return whether this output is watched as it is written (HLS or a stream)."""
        return self.kind != "file"

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

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
                log.warning("%s: timestamps not increasing at pts %d; nudging them", self.name, out)
                self._warned_pts = True
            out = self._last_pts + 1
        return out

    def speed_up(self) -> str | None:
        """Switch to the next faster x264 preset and return it; None if there is none.

        Only MPEG-TS outputs (HLS, udp, srt, tcp, -) can: the new encoder's stream headers go
        in-band with its first keyframe, where every decoder finds them; a file's or an FLV's
        headers are written once, at the start.
        """
        faster = FASTER_PRESETS.get(self.preset) if self.encoder == "libx264" else None
        mpegts = self.kind == "hls" or (self.kind == "stream" and not self.name.startswith("rtmp"))
        if faster is None or not mpegts or self._closed:
            return None
        old = self._encoder or self._stream.codec_context
        self._mux(old.encode(None))  # zerolatency: no frame is held back, none is lost
        new = av.CodecContext.create("libx264", "w")
        new.width, new.height, new.pix_fmt = old.width, old.height, old.pix_fmt
        new.time_base, new.framerate = old.time_base, old.framerate
        new.flags = old.flags & ~Flags.global_header  # its headers in-band
        new.options = {**self._options, "preset": faster}
        new.open()
        self._encoder, self.preset = new, faster
        return faster

    def _encode(self, frame: av.VideoFrame | None) -> list[av.Packet]:
        """Return the packets of ``frame`` (None: flush) from the encoder in use."""
        if self._encoder is None:
            return self._stream.encode(frame)
        return self._encoder.encode(frame)

    def _mux(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            packet.stream = self._stream
        self._output.mux(packets)

    def _pace(self, seconds: float) -> None:
        """Wait until the wall clock reaches ``seconds`` on the stream's own clock (run at the
        pace's speed: 1x, or faster for a live source's frames, which come in real time)."""
        now = time.monotonic()
        if self._paced_from is None:
            self._paced_from = (now, seconds)
            return
        wall, first = self._paced_from
        delay = wall + (seconds - first) / self._pace_speed - now
        if delay > 0:
            time.sleep(delay)

    def write(
        self,
        image: np.ndarray,
        pts: int | None,
        time_base: Fraction,
        audio: Iterable[av.Packet] = (),
    ) -> None:
        """Encode one (height, width, 3) uint8 RGB picture at ``pts``, then ``audio``'s packets."""
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
        if self.live:
            self._pace(float(out_pts * self._time_base))
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = out_pts
        frame.time_base = self._time_base
        try:
            self._mux(self._encode(frame))
            if self._audio is not None:
                self._audio.add(audio)
        except (av.FFmpegError, OSError) as exc:
            raise ScoreCamError(f"cannot write {self.name}: {reason(exc)}") from exc
        self._last_pts = out_pts
        self._frames += 1

    def add_audio(self, packets: Iterable[av.Packet]) -> None:
        """Mux audio packets that follow the last frame (the reader's trailing audio)."""
        if self._audio is not None:
            try:
                self._audio.add(packets)
            except (av.FFmpegError, OSError) as exc:
                raise ScoreCamError(f"cannot write {self.name}: {reason(exc)}") from exc

    def close(self) -> None:
        """Flush the encoder and the audio, and close the output."""
        if self._closed:
            return
        if self._frames == 0:
            self.abort()
            raise ScoreCamError(f"no frames to write to {self.name} (empty input or time window?)")
        try:
            self._mux(self._encode(None))
            if self._audio is not None:
                self._audio.finish()
            self._closed = True
            self._output.close()  # writes the index (mp4) or the playlist's end tag (HLS)
        except (av.FFmpegError, OSError) as exc:
            self.abort()
            raise ScoreCamError(f"cannot write {self.name}: {reason(exc)}") from exc

    def abort(self) -> None:
        """Close without flushing; the caller discards a file output."""
        self._closed = True
        try:
            self._output.close()
        except (av.FFmpegError, OSError) as exc:
            log.debug("ignoring an error while closing %s: %s", self.name, exc)
