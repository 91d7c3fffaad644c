"""Still images and output files that appear only when whole."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import av
import numpy as np

from ..errors import ScoreCamError
from .inputs import STDIN, is_url, reason

log = logging.getLogger("scorecam_stream.video")

IMAGE_CODECS = {
    ".png": ("png", "rgb24"),
    ".jpg": ("mjpeg", "yuvj420p"),
    ".jpeg": ("mjpeg", "yuvj420p"),
}


def write_image(path: str, image: np.ndarray, name: str | None = None) -> None:
    """Write a (H, W, 3) uint8 RGB picture as PNG or JPEG, chosen by ``name``'s extension.

    ``name`` defaults to ``path`` (see :func:`atomic_output` for why they may differ).
    """
    codec = IMAGE_CODECS.get(Path(name or path).suffix.lower())
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


def _unnamed_file(directory: Path) -> int | None:
    """Return a file descriptor of a new file in ``directory`` with no name, or None.

    Linux's O_TMPFILE: the file exists only while the descriptor is open, so a process that is
    killed (SIGKILL, the OOM killer, Ray ending its driver) leaves nothing behind.
    """
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not Path("/proc/self/fd").is_dir():
        return None
    try:
        return os.open(directory, flag | os.O_RDWR, 0o600)
    except OSError:  # a filesystem without O_TMPFILE support
        return None


def _link_unnamed(proc_path: Path, name: Path) -> None:
    """Give the unnamed file at ``/proc/self/fd/N`` the name ``name`` (it must not exist)."""
    # linkat(AT_FDCWD, "/proc/self/fd/N", AT_FDCWD, name, AT_SYMLINK_FOLLOW) needs no
    # privilege; os.link would link the /proc entry itself (a cross-device link).
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_symlink_follow = -100, 0x400
    if libc.linkat(
        at_fdcwd, os.fsencode(proc_path), at_fdcwd, os.fsencode(name), at_symlink_follow
    ):
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _sweep_stale(directory: Path, name: str) -> None:
    """Delete the named temporaries of ``name`` left by processes of ours that died."""
    for stale in directory.glob(f".{name}.tmp-*"):
        pid = stale.name.removeprefix(f".{name}.tmp-").split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                stale.unlink()


def check_output_dir(path: str | Path, create: bool) -> None:
    """Check that the directory ``path`` goes in exists (``create``: make it) and is writable."""
    parent = Path(path).parent
    if parent.exists() and not parent.is_dir():
        raise ScoreCamError(f"output directory {parent} is not a directory")
    if not parent.is_dir() and create:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ScoreCamError(f"cannot create output directory {parent}: {reason(exc)}") from exc
        log.info("created output directory %s", parent)
    if not parent.is_dir():
        raise ScoreCamError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ScoreCamError(f"output directory {parent} is not writable")


def check_output_dirs(paths: Iterable[str], create: bool) -> None:
    """Check the directories of the file outputs among ``paths`` (streams are not files)."""
    for path in paths:
        if path != STDIN and not is_url(path):
            check_output_dir(path, create)


def _check_target(path: str | Path, overwrite: bool) -> Path:
    """Return ``path`` as a Path once it may be written: not a directory, not kept, writable."""
    target = Path(path)
    if target.is_dir():
        raise ScoreCamError(f"output {target} is a directory")
    if target.exists() and not overwrite:
        raise ScoreCamError(f"output {target} exists; pass --overwrite")
    check_output_dir(target, create=False)
    return target


def visible_output(path: str | Path, overwrite: bool) -> Path:
    """Return ``path``, checked like :func:`atomic_output`'s, for a file written in place.

    For what a live run writes as it goes (its records): readable while the run is on, and
    what was written before a kill is kept.
    """
    return _check_target(path, overwrite)


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a path to write ``path``'s content to; it becomes ``path`` only on success.

    On Linux the yielded path (``/proc/self/fd/N``) is a file with no name in ``path``'s
    directory, linked into place at the end: even a killed process leaves no file behind.
    Elsewhere it is a hidden temporary beside ``path``, deleted on any exception; such files
    left by a killed run are swept by the next run. The yielded path has no meaningful
    extension: writers that choose a format by it are given ``path`` too. An existing file at
    ``path`` is left untouched unless the run succeeds.
    """
    target = _check_target(path, overwrite)
    parent = target.parent
    fd = _unnamed_file(parent)
    prefix = f".{target.name}.tmp-{os.getpid()}-"
    if fd is None:
        _sweep_stale(parent, target.name)
        try:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=target.suffix, dir=parent)
        except OSError as exc:
            raise ScoreCamError(f"cannot create a file in {parent}: {reason(exc)}") from exc
        temporary, named = Path(name), True
    else:
        temporary, named = Path(f"/proc/self/fd/{fd}"), False
    linked: Path | None = None
    try:
        yield temporary
        if os.fstat(fd).st_size == 0:
            raise ScoreCamError(f"nothing was written for {target}")
        try:
            mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else _default_file_mode()
            os.fchmod(fd, mode)
            if not named:  # give it a name beside the target (an instant), then replace
                linked = Path(tempfile.mktemp(prefix=prefix, suffix=target.suffix, dir=parent))
                _link_unnamed(temporary, linked)
            os.replace(linked or temporary, target)
            linked = None
        except OSError as exc:
            raise ScoreCamError(f"cannot move the output into {target}: {reason(exc)}") from exc
    except BaseException:
        if named:
            temporary.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
        if linked is not None:
            linked.unlink(missing_ok=True)
