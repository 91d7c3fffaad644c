"""The input's audio in the output: packets from the reader's demux, copied or re-encoded."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from fractions import Fraction

import av
import av.container

log = logging.getLogger("scorecam_stream.video")

AUDIO_FALLBACK_CODEC = "aac"
# Audio codecs copied into mp4 as they are. FFmpeg would also put PCM or Vorbis in an mp4, but
# few players play that, so those are re-encoded; other containers take what FFmpeg accepts.
MP4_AUDIO_COPY = frozenset({"aac", "mp3", "opus", "alac", "flac", "ac3", "eac3"})
FLV_AUDIO_COPY = frozenset({"aac", "mp3"})


class AudioTrack:
    """Muxes an input audio stream's packets into an output, copied when it can hold them.

    Only packets with ``start <= time < end`` (input seconds) are kept; ``offset`` seconds are
    subtracted from every timestamp, as from the video's. Packets that do not fit the output
    container's codecs are decoded and re-encoded to AAC. A packet (or decoded frame) that does
    not come after the last one muxed is dropped: across a live source's restart the audio of
    the new run can arrive before the video frame that shows the break (and shifts the clock).
    """

    def __init__(
        self,
        source: av.AudioStream,
        output: av.container.OutputContainer,
        start: float | None = None,
        end: float | None = None,
        offset: float = 0.0,
    ) -> None:
        self._in_stream = source
        self._output = output
        self._start = start if start is not None else (offset if offset > 0 else None)
        self._end = end
        self._offset_units = round(offset / source.time_base)
        self._last: Fraction | None = None  # seconds of the last packet or frame muxed
        self.dropped = 0
        copyable = {"mp4": MP4_AUDIO_COPY, "flv": FLV_AUDIO_COPY}.get(output.format.name)
        self._reencode = copyable is not None and source.codec_context.name not in copyable
        if not self._reencode:
            try:
                self._out_stream = output.add_stream_from_template(source)
            except ValueError:  # the output container cannot hold this codec
                self._reencode = True
        if self._reencode:
            self._out_stream = self._add_encoder(output)
        log.debug(
            "audio: %s %s",
            "re-encoding to" if self._reencode else "copying",
            self._out_stream.codec_context.name,
        )

    def _add_encoder(self, output: av.container.OutputContainer) -> av.AudioStream:
        rates = av.codec.Codec(AUDIO_FALLBACK_CODEC, "w").audio_rates or ()
        rate = self._in_stream.rate if self._in_stream.rate in rates else 48000
        stream = output.add_stream(AUDIO_FALLBACK_CODEC, rate=rate)
        stream.layout = "mono" if self._in_stream.channels == 1 else "stereo"
        return stream

    def add(self, packets: Iterable[av.Packet]) -> None:
        """Mux the packets (in demux order) that fall in the window."""
        for packet in packets:
            timestamp = packet.pts if packet.pts is not None else packet.dts
            if timestamp is None:  # the demuxer's final empty packet
                continue
            seconds = float(timestamp * packet.time_base)
            if self._start is not None and seconds < self._start:
                continue
            if self._end is not None and seconds >= self._end:
                continue
            self._mux(packet)

    def _goes_forward(self, timestamp: int | None, time_base: Fraction | None) -> bool:
        """Return whether a timestamp comes after the last one muxed (and take it as the last)."""
        if timestamp is None or time_base is None:
            return True
        at = timestamp * time_base
        if self._last is not None and at <= self._last:
            if self.dropped == 0:
                log.warning("audio timestamps went back (a restart?): dropping what overlaps")
            self.dropped += 1
            return False
        self._last = at
        return True

    def _mux(self, packet: av.Packet) -> None:
        if not self._reencode:
            if packet.pts is not None:
                packet.pts -= self._offset_units
            if packet.dts is not None:
                packet.dts -= self._offset_units
            if not self._goes_forward(packet.dts, packet.time_base):
                return
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
                if not self._goes_forward(frame.pts, frame.time_base):
                    continue
            self._output.mux(self._out_stream.encode(frame))

    def finish(self) -> None:
        """When re-encoding, flush the decoder and the encoder."""
        if self._reencode:
            with contextlib.suppress(av.FFmpegError):
                self._encode(self._in_stream.codec_context.decode(None))
            self._output.mux(self._out_stream.encode(None))
