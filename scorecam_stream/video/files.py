"""Still images and output files that appear only when whole."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from ..errors import ScoreCamError
from .reader import reason

IMAGE_CODECS = {
    ".png": ("png", "rgb24"),
    ".jpg": ("mjpeg", "yuvj420p"),
    ".jpeg": ("mjpeg", "yuvj420p"),
}


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
        raise ScoreCamError(f"cannot write {path}: {reason(exc)}") from exc


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
        raise ScoreCamError(f"cannot create a file in {parent}: {reason(exc)}") from exc
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
            raise ScoreCamError(f"cannot move the output into {target}: {reason(exc)}") from exc
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
