"""What a batch reports: each video's record, progress, the summary file."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class VideoRecord:
    """What happened to one video: done, skipped (its output existed) or failed (why)."""

    input: str
    output: str
    status: str  # "done" | "skipped" | "failed"
    frames: int = 0
    explained: int = 0
    seconds: float = 0.0
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """Return the record as the summary file's line."""
        return {**dataclasses.asdict(self), "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class BatchProgress:
    """Where the batch stands: videos finished of those to run, frames, speed, time left."""

    videos_done: int  # finished (done or failed) of videos_total
    videos_total: int  # videos to run (skipped ones not counted)
    frames: int  # frames written so far, videos in progress included
    frames_per_s: float
    eta_s: float | None  # None: not known yet


@dataclass(frozen=True)
class BatchResult:
    """Every video's record, in input order, and the batch's totals."""

    records: tuple[VideoRecord, ...]
    seconds: float  # wall time of the whole batch, model start-up included

    def with_status(self, status: str) -> list[VideoRecord]:
        """Return the records with ``status``."""
        return [r for r in self.records if r.status == status]

    @property
    def frames(self) -> int:
        """Return the frames written by the videos done."""
        return sum(r.frames for r in self.records)


class SummaryWriter:
    """The ``--summary`` JSON lines: one per finished video.

    Each record is appended and flushed to ``<summary>.part`` as its video finishes, so a
    killed run leaves the records of its finished videos there; :meth:`close` (at the end, or
    after an interrupt) writes them all, in input order, to the summary file at once
    (``os.replace``) and removes the part file. The summary is a report of this run: it is
    replaced each run (a resumed run lists the earlier ones as skipped).
    """

    def __init__(self, path: str | None, order: Sequence[str]) -> None:
        self.path = Path(path) if path else None
        self._order = {item: i for i, item in enumerate(order)}
        self._records: list[VideoRecord] = []
        self._part = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._part_path = self.path.with_name(self.path.name + ".part")
            self._part = self._part_path.open("w", encoding="utf-8")

    @property
    def records(self) -> list[VideoRecord]:
        """Return the records so far, in the order they came."""
        return list(self._records)

    def add(self, record: VideoRecord) -> None:
        """Keep ``record``; append it to the part file now."""
        self._records.append(record)
        if self._part is not None:
            self._part.write(json.dumps(record.as_json()) + "\n")
            self._part.flush()

    def close(self) -> None:
        """Write the summary file whole, from the records so far."""
        if self._part is None or self.path is None:
            return
        self._part.close()
        self._part = None
        records = sorted(self._records, key=lambda r: self._order.get(r.input, len(self._order)))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r.as_json()) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, self.path)
        self._part_path.unlink(missing_ok=True)


class Tally:
    """Frames done per video in progress and per finished video, for speed and time left."""

    def __init__(self, total_videos: int, began: float) -> None:
        self.total_videos = total_videos
        self.began = began
        self.finished_videos = 0
        self.finished_frames = 0
        self.done_videos = 0  # finished and succeeded: their frames give the mean length
        self.done_frames = 0
        self.running: dict[int, tuple[int, int | None]] = {}  # job -> (frames done, expected)

    def finished(self, record: VideoRecord) -> None:
        """Count a finished video (done or failed)."""
        self.finished_videos += 1
        self.finished_frames += record.frames
        if record.status == "done":
            self.done_videos += 1
            self.done_frames += record.frames

    def snapshot(self) -> BatchProgress:
        frames = self.finished_frames + sum(done for done, _ in self.running.values())
        elapsed = time.perf_counter() - self.began
        rate = frames / elapsed if elapsed > 0 else 0.0
        known = [t for _, t in self.running.values() if t] + (
            [self.done_frames / self.done_videos] if self.done_videos else []
        )
        eta = None
        if rate > 0 and known:
            mean = (
                self.done_frames / self.done_videos if self.done_videos else sum(known) / len(known)
            )
            left = sum(max(0.0, (t or mean) - done) for done, t in self.running.values())
            unstarted = self.total_videos - self.finished_videos - len(self.running)
            eta = (left + max(0, unstarted) * mean) / rate
        return BatchProgress(self.finished_videos, self.total_videos, frames, rate, eta)
