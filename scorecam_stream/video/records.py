"""The records reading gives: an input's :class:`VideoInfo` and its decoded :class:`Frame` s."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np


@dataclass(frozen=True)
class VideoInfo:
    """What the reader learns about an input's first video stream when it opens it."""

    path: str  # as given (file path, URL, "-")
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
    audio: tuple[av.Packet, ...] = ()  # audio packets demuxed since the previous frame
    arrival: float = 0.0  # time.monotonic() when the frame was decoded
