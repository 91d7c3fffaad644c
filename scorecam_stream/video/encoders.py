"""Which video encoder writes the output, and with what options.

libx264 is the default and the fallback. ``--encoder`` may name any video encoder of the
FFmpeg build PyAV carries (``h264_nvenc``, ``h264_qsv``, ``h264_amf``, ``libx265``, ...); a
hardware encoder whose device is absent fails to open, and the output is then written with
libx264, said in one log line. Encoders that want frames already on the device (``*_vaapi``)
cannot take the software frames this tool gives them: they fall back the same way.
"""

from __future__ import annotations

import logging
from fractions import Fraction

import av

from ..errors import ScoreCamError
from .inputs import reason

log = logging.getLogger("scorecam_stream.video")

DEFAULT_ENCODER = "libx264"
# Encoders that take x264's quality scale (--crf) and its speed presets.
_CRF_ENCODERS = {"libx264", "libx265"}
# The x264 presets a live output steps through when its encoder falls behind.
FASTER_PRESETS = {"veryfast": "superfast", "superfast": "ultrafast"}
_REALTIME_PRESET = "veryfast"


def check_encoder(name: str) -> None:
    """Raise a one-line :class:`ScoreCamError` unless FFmpeg here has a video encoder ``name``."""
    try:
        codec = av.codec.Codec(name, "w")
    except (av.FFmpegError, ValueError):
        codec = None
    if codec is None or codec.type != "video":
        raise ScoreCamError(
            f"unknown --encoder '{name}': not a video encoder of this FFmpeg build "
            "(e.g. libx264, h264_nvenc, h264_qsv)"
        )


def pixel_format(name: str) -> str:
    """Return the pixel format frames are given to ``name`` in: yuv420p where it can."""
    formats = [f.name for f in av.codec.Codec(name, "w").video_formats or ()]
    for wanted in ("yuv420p", "nv12"):
        if not formats or wanted in formats:
            return wanted
    return formats[0]


def encoder_options(name: str, crf: int, fps: float, live: bool, realtime: bool) -> dict:
    """Return the encoder's options.

    ``live``: the output is watched as it is written (low latency, a keyframe a second);
    ``realtime``: the frames come at a live source's pace, so x264 takes a fast preset.
    """
    # B-frames are off: with them, a variable-rate mp4 gets a track duration shorter than
    # its last timestamp (dts lag behind pts unevenly), and a live viewer waits for them.
    options = {"bf": "0"}
    if live:
        options["g"] = str(max(1, round(fps)))
    if name in _CRF_ENCODERS:
        options["crf"] = str(crf)
    if name == "libx265":
        options["x265-params"] = "log-level=error"  # x265 prints its settings to stderr
    if name == "libx264":
        if live:
            options["tune"] = "zerolatency"
        if live or realtime:
            options["preset"] = _REALTIME_PRESET
    return options


def usable_encoder(
    name: str, width: int, height: int, fps: Fraction, time_base: Fraction, options: dict
) -> str:
    """Return ``name`` if it opens for this output (size, rate, time base), else libx264 (logged).

    The trial is the output's own settings: an encoder may refuse a time base (mpeg4 takes no
    denominator over 65535, MPEG-TS's 1/90000 among them) as a hardware one refuses to open.
    """
    if name == DEFAULT_ENCODER:
        return name
    try:
        trial = av.CodecContext.create(name, "w")
        trial.width, trial.height = width, height
        trial.pix_fmt = pixel_format(name)
        trial.time_base, trial.framerate = time_base, fps
        trial.options = options
        trial.open()
    except (av.FFmpegError, OSError, ValueError) as exc:
        log.warning("--encoder %s cannot open here (%s); writing with libx264", name, reason(exc))
        return DEFAULT_ENCODER
    log.info("writing with %s", name)
    return name
