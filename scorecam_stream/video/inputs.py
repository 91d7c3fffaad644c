"""What an input is (a file, a URL, ``-`` for stdin, a device) and opening it.

Mistakes a user can cause (a missing, empty or unreadable input) raise
:class:`~scorecam_stream.errors.ScoreCamError` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import av
import av.container

from ..errors import ScoreCamError

URL_TIMEOUT_S = 30.0  # open and read timeout for network inputs, so a dead stream cannot hang
STDIN = "-"
# Schemes read as live sources by default: network streams. Plain files and file:// are not.
_FILE_SCHEMES = frozenset({"", "file"})


def is_url(path: str) -> bool:
    """Return whether ``path`` is a URL (``scheme://...``) rather than a file path."""
    return "://" in path


def is_glob(item: str) -> bool:
    """Return whether ``item`` is a glob pattern (``*``, ``?`` or ``[...]``)."""
    return any(c in item for c in "*?[")


def is_live_source(path: str, input_format: str | None = None) -> bool:
    """Return whether ``path`` is read live by default: a network URL, stdin or a device."""
    if path == STDIN or input_format is not None:
        return True
    return is_url(path) and urlparse(path).scheme.lower() not in _FILE_SCHEMES


def one_line(text: object) -> str:
    """Return ``text`` on one line (runs of whitespace, newlines included, become one space)."""
    return " ".join(str(text).split())


def reason(exc: BaseException) -> str:
    """Return FFmpeg's or the OS's one-line reason for ``exc``, without the errno."""
    return one_line(getattr(exc, "strerror", None) or exc)


def _open_error(path: str, exc: Exception) -> ScoreCamError:
    """Return a one-line ScoreCamError for a failed ``av.open`` of ``path``."""
    if isinstance(exc, av.error.InvalidDataError):
        why = "not a video or image FFmpeg can read, or the file is truncated or corrupt"
    elif isinstance(exc, av.error.ExitError):
        why = "no data arrived before the timeout"
    else:
        why = reason(exc)
    return ScoreCamError(f"cannot read {path}: {why}")


def open_input(
    path: str,
    input_format: str | None = None,
    options: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> av.container.InputContainer:
    """Return an open input container; files are checked first, URLs go to FFmpeg as they are.

    ``-`` is standard input. ``timeout`` bounds the open and each read (default: 30 s for URLs
    and pipes, none for files).
    """
    source = "pipe:0" if path == STDIN else path
    if not is_url(path) and path != STDIN and input_format is None:
        file = Path(path)
        if not file.exists():
            raise ScoreCamError(f"input not found: {path}")
        if not file.is_file():
            raise ScoreCamError(f"input is not a file: {path}")
        if file.stat().st_size == 0:
            raise ScoreCamError(f"input is empty (0 bytes): {path}")
    elif timeout is None:
        timeout = URL_TIMEOUT_S
    try:
        return av.open(
            source,
            mode="r",
            format=input_format,
            options=dict(options or {}),
            timeout=timeout,
        )
    except (av.FFmpegError, OSError) as exc:
        raise _open_error(path, exc) from exc
    except ValueError as exc:  # an unknown --input-format
        raise ScoreCamError(f"cannot read {path}: {one_line(exc)}") from exc
