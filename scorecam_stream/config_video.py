"""The input and output sections of a run's configuration, each validated on construction.

How the input is read (:class:`SourceConfig`), which part of it (:class:`WindowConfig`), where
the results go and how the video is written (:class:`OutputConfig`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .choices import LAYOUTS, SCALES, spelled
from .config_checks import check_window, require
from .render import COLORMAPS

RECONNECT_ATTEMPTS = 10  # default --reconnect of live network inputs
RECONNECT_MAX_DELAY_S = 30.0  # the backoff between attempts grows to this at most


@dataclass(frozen=True)
class SourceConfig:
    """How the input is opened and read: live (source pace, newest frame) or every frame.

    ``live``: None decides by the input (network URLs, ``-`` and devices are live).
    ``input_option``: FFmpeg demuxer/protocol options as ``KEY=VALUE`` strings.
    ``read_timeout``: seconds without data after which the input has ended (default 10 for
    live inputs, 30 for other URLs).
    ``reconnect``: attempts to reopen a live network input that broke off or ended, per outage
    (0: none; None: RECONNECT_ATTEMPTS for live network inputs, else none); the first waits
    ``reconnect_delay`` seconds, each next one twice as long (at most RECONNECT_MAX_DELAY_S).
    """

    live: bool | None = None
    input_format: str | None = None
    input_option: tuple[str, ...] = ()
    read_timeout: float | None = None
    reconnect: int | None = None
    reconnect_delay: float = 1.0

    def __post_init__(self) -> None:
        require(
            isinstance(self.input_option, (tuple, list))
            and all(isinstance(o, str) and "=" in o.strip("=") for o in self.input_option),
            f"--input-option takes KEY=VALUE, got {self.input_option}",
        )
        require(
            self.read_timeout is None
            or (math.isfinite(self.read_timeout) and self.read_timeout > 0),
            f"--read-timeout must be > 0 seconds, got {self.read_timeout}",
        )
        require(
            self.reconnect is None
            or (
                isinstance(self.reconnect, int)
                and not isinstance(self.reconnect, bool)
                and self.reconnect >= 0
            ),
            f"--reconnect must be a number of attempts >= 0, got {self.reconnect}",
        )
        require(
            isinstance(self.reconnect_delay, (int, float))
            and math.isfinite(self.reconnect_delay)
            and self.reconnect_delay > 0,
            f"--reconnect-delay must be > 0 seconds, got {self.reconnect_delay}",
        )
        require(
            self.input_format is None or bool(self.input_format.strip()),
            "--input-format must name an FFmpeg input format (e.g. v4l2, mpegts)",
        )

    @property
    def options(self) -> dict[str, str]:
        """Return the FFmpeg options as a dict."""
        return dict(option.split("=", 1) for option in self.input_option)


@dataclass(frozen=True)
class WindowConfig:
    """Which part of the input is processed; ``duration``: seconds of source after its first."""

    start: float | None = None
    end: float | None = None
    max_frames: int | None = None
    duration: float | None = None

    def __post_init__(self) -> None:
        check_window(self.start, self.end, self.max_frames)
        require(
            self.duration is None or (math.isfinite(self.duration) and self.duration > 0),
            f"--duration must be > 0 seconds, got {self.duration}",
        )


@dataclass(frozen=True)
class OutputConfig:
    """Where results go and how the video is written."""

    output: str | None = None
    overwrite: bool = False
    crf: int = 20
    encoder: str = "libx264"
    layout: str = "overlay"
    colormap: str = "jet"
    alpha: float = 0.5
    scale: str = "running"
    save_maps: str | None = None
    jsonl: str | None = None
    preview: str | None = None
    hls_time: float = 2.0
    hls_list_size: int = 6
    output_size: tuple[int, int] | None = None  # (width, height); None: the input's

    def __post_init__(self) -> None:
        require(0 <= self.crf <= 51, f"--crf must be in [0, 51], got {self.crf}")
        # Whether FFmpeg has it is checked with the outputs, before anything slow (video.encoders).
        require(
            isinstance(self.encoder, str) and self.encoder.strip() == self.encoder != "",
            f"--encoder must name a video encoder, got {self.encoder!r}",
        )
        require(
            self.output_size is None
            or (
                isinstance(self.output_size, tuple)
                and len(self.output_size) == 2
                and all(isinstance(v, int) and 16 <= v <= 8192 for v in self.output_size)
            ),
            f"--output-size must be WIDTHxHEIGHT, each 16 to 8192 pixels, got {self.output_size}",
        )
        require(
            math.isfinite(self.hls_time) and self.hls_time > 0,
            f"--hls-time must be > 0 seconds, got {self.hls_time}",
        )
        require(self.hls_list_size >= 0, f"--hls-list-size must be >= 0, got {self.hls_list_size}")
        require(self.layout in LAYOUTS, f"--layout must be {spelled(LAYOUTS)}, got '{self.layout}'")
        require(
            self.colormap in COLORMAPS,
            f"unknown --colormap '{self.colormap}' (e.g. jet, turbo, inferno, viridis)",
        )
        require(0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], got {self.alpha}")
        require(self.scale in SCALES, f"--scale must be {spelled(SCALES)}, got '{self.scale}'")
        require(
            self.save_maps is None or self.save_maps.endswith(".npz"),
            f"--save-maps must name a .npz file, got '{self.save_maps}'",
        )
        require(
            self.preview is None or self.preview.lower().endswith(".png"),
            f"--preview must name a .png file, got '{self.preview}'",
        )

    @property
    def paths(self) -> tuple[str, ...]:
        """Return the outputs named here (video, maps, records, preview), streams included."""
        named = (self.output, self.save_maps, self.jsonl, self.preview)
        return tuple(path for path in named if path)
