"""Side outputs written as frames are done: the maps (npz), per-frame records (jsonl), a preview.

All of them stream: memory does not grow with the video's length (the npz's maps go through a
temporary file on disk and are copied into the archive at the end).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from .records import FrameResult
from .render import preview_sheet
from .video import Frame, write_image


class MapsWriter:
    """Writes ``maps`` (N, [T,] S, S) float32, ``targets`` (N, [T]) and ``pts_seconds`` (N,)."""

    def __init__(self, path: Path, scratch: Path | None = None) -> None:
        self.path = path
        # Closed by close()/abort(); deleted by the OS when closed. In ``scratch`` (the
        # output's own directory: the same disk, which has room for the maps).
        self._raw: IO[bytes] = tempfile.TemporaryFile(dir=scratch or path.parent)  # noqa: SIM115
        self._shape: tuple[int, ...] | None = None
        self._targets: list[np.ndarray] = []
        self._seconds: list[float] = []

    def add(self, maps: np.ndarray, targets: np.ndarray, seconds: float) -> None:
        """Append one frame's maps ([T,] S, S) and targets ([T])."""
        maps = np.ascontiguousarray(maps, dtype=np.float32)
        if self._shape is None:
            self._shape = maps.shape
        self._raw.write(maps.tobytes())
        self._targets.append(np.asarray(targets, dtype=np.int64))
        self._seconds.append(seconds)

    def close(self) -> None:
        """Write the npz archive (maps copied from the temporary file in blocks)."""
        count = len(self._seconds)
        shape = (count, *(self._shape or (0, 0)))
        with zipfile.ZipFile(self.path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("maps.npy", "w", force_zip64=True) as entry:
                header = {"descr": "<f4", "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(entry, header)
                self._raw.seek(0)
                shutil.copyfileobj(self._raw, entry, 1 << 20)
            targets = np.stack(self._targets) if self._targets else np.zeros(0, np.int64)
            for name, array in (
                ("targets", targets),
                ("pts_seconds", np.asarray(self._seconds, np.float64)),
            ):
                with archive.open(f"{name}.npy", "w") as entry:
                    np.lib.format.write_array(entry, array)
        self._raw.close()

    def abort(self) -> None:
        """Drop the temporary data."""
        self._raw.close()


class RecordsWriter:
    """Writes one JSON object per line, flushed as each frame is done."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("w", encoding="utf-8")

    def add(self, record: dict[str, Any]) -> None:
        """Append one record."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


class PreviewSampler:
    """Keeps ~``count`` evenly spaced small copies of the frames it is shown (any length).

    Frames are kept at a stride that doubles whenever twice ``count`` are held, so memory is
    bounded without knowing the number of frames in advance.
    """

    def __init__(self, count: int = 8, tile_width: int = 320, min_tile_height: int = 180) -> None:
        self.count = count
        self.tile_width = tile_width
        # Wide frames (side by side) get wider tiles, so that their labels stay readable.
        self.min_tile_height = min_tile_height
        self._stride = 1
        self._seen = 0
        self._kept: list[np.ndarray] = []

    def offer(self, image: np.ndarray) -> None:
        """Show one rendered frame (RGB uint8)."""
        if self._seen % self._stride == 0:
            h, w = image.shape[:2]
            width = max(self.tile_width, min(w, round(self.min_tile_height * w / h)))
            size = (width, max(1, round(h * width / w)))
            self._kept.append(cv2.resize(image, size, interpolation=cv2.INTER_AREA))
            if len(self._kept) >= 2 * self.count:
                self._kept = self._kept[::2]
                self._stride *= 2
        self._seen += 1

    def write(self, path: Path, name: str | None = None) -> None:
        """Write the contact sheet of ~count evenly spaced kept frames as PNG (to ``path``).

        ``name`` is the sheet's real name when ``path`` is a temporary (see atomic_output).
        """
        step = max(1, len(self._kept) / self.count)
        chosen = [self._kept[int(i * step)] for i in range(min(self.count, len(self._kept)))]
        width = chosen[0].shape[1] if chosen else self.tile_width
        sheet = preview_sheet(chosen, columns=4, tile_width=width)
        write_image(str(path), sheet, name=name)


@dataclass
class Outputs:
    """Where one run writes: the claimed temporary paths and the side-output writers."""

    video: Path | str | None  # a temporary file, an HLS playlist or a stream URL; None: none
    video_name: str  # the video output's real name (``video`` may be a temporary)
    image: bool  # the input is a still image: the output is one PNG/JPEG
    maps: MapsWriter | None
    records: RecordsWriter | None
    preview: PreviewSampler | None
    preview_path: Path | None
    preview_name: str | None

    def add_maps(self, result: FrameResult, frame: Frame, every_target: bool) -> None:
        """Append an explained frame's maps (its first, or ``every_target``'s) to the npz."""
        if self.maps is None:
            return
        maps = result.maps if every_target else result.maps[0]
        targets = result.targets if every_target else result.targets[0]
        self.maps.add(maps, targets, frame.seconds)

    def abort(self) -> None:
        """Drop what was not finished."""
        if self.maps is not None:
            self.maps.abort()

    def close(self) -> None:
        """Write the maps archive and the preview sheet."""
        if self.maps is not None:
            self.maps.close()
        if self.preview is not None and self.preview_path is not None:
            self.preview.write(self.preview_path, self.preview_name)
