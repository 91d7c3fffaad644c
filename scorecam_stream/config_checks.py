"""The rules option values must satisfy that more than one module applies.

:func:`require` turns a broken rule into the user's one-line error; :func:`check_window` is the
one rule for a time window, applied by the configuration and by the video reader.
"""

from __future__ import annotations

import math

from .errors import ScoreCamError


def require(ok: bool, message: str) -> None:
    """Return nothing when ``ok``; else raise ScoreCamError(message) (exit 2, one line)."""
    if not ok:
        raise ScoreCamError(message)


def check_window(start: float | None, end: float | None, max_frames: int | None) -> None:
    """Raise ScoreCamError unless the window is valid: the one rule (config and video.py)."""
    for name, value in (("--start", start), ("--end", end)):
        require(
            value is None
            or (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0),
            f"{name} must be a time >= 0 in seconds, got {value}",
        )
    require(
        start is None or end is None or end > start,
        f"--end ({end}) must be after --start ({start})",
    )
    require(end is None or end > 0, f"--end must be > 0 seconds, got {end}")
    require(max_frames is None or max_frames >= 1, f"--max-frames must be >= 1, got {max_frames}")
