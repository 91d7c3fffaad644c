"""What ``scorecam-video`` shows on stderr: progress while it runs, one line when it ends.

A tqdm bar on a terminal; a batch not on a terminal gets one line per video instead.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .cli_parser import PROG

if TYPE_CHECKING:
    from tqdm import tqdm

    from .batch import BatchProgress, BatchResult, VideoRecord
    from .config_batch import BatchConfig
    from .records import RunSummary


class ProgressBar:
    """A tqdm bar of frames on stderr, created at the first frame."""

    def __init__(self) -> None:
        self._bar: tqdm[Any] | None = None

    def __call__(self, done: int, total: int | None) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="frame", file=sys.stderr, dynamic_ncols=True)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _clock(seconds: float | None) -> str:
    """Return ``H:MM:SS`` (``?`` when unknown)."""
    if seconds is None:
        return "?"
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class BatchDisplay:
    """A batch's progress on stderr: a tqdm bar of videos on a terminal, else a line a video."""

    def __init__(self, quiet: bool, tty: bool) -> None:
        self.quiet = quiet
        self._bar = None
        if not quiet and tty:
            from tqdm import tqdm

            self._bar = tqdm(total=None, unit="video", file=sys.stderr, dynamic_ncols=True)

    def _status(self, progress: BatchProgress) -> str:
        return f"{progress.frames_per_s:.2f} frames/s, ETA {_clock(progress.eta_s)}"

    def progress(self, progress: BatchProgress) -> None:
        """Called as frames are written (from the videos' threads, one call at a time)."""
        if self._bar is not None:
            self._bar.total = progress.videos_total
            self._bar.set_postfix_str(self._status(progress))

    def record(self, record: VideoRecord, progress: BatchProgress) -> None:
        """Called as each video finishes."""
        if self._bar is not None:
            self._bar.total = progress.videos_total
            self._bar.update(progress.videos_done - self._bar.n)
            self._bar.set_postfix_str(self._status(progress))
            if record.status == "failed":
                self._bar.write(f"{PROG}: failed: {record.input}: {record.error}", file=sys.stderr)
            return
        if self.quiet:
            return
        what = (
            f"{record.output} ({record.frames} frames, {record.seconds:.1f} s)"
            if record.status == "done"
            else record.error
        )
        print(
            f"{PROG}: [{progress.videos_done}/{progress.videos_total}] {record.status} "
            f"{record.input}: {what}; {self._status(progress)}",
            file=sys.stderr,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def run_line(summary: RunSummary) -> str:
    """Return the line that ends a one-input run: what was written, how fast, how fresh."""
    rate = summary.frames / summary.seconds if summary.seconds else 0.0
    line = (
        f"{PROG}: wrote {summary.output} ({summary.frames} frames, "
        f"{summary.explained} explained, target {summary.target}) in "
        f"{summary.seconds:.1f} s, {rate:.2f} frames/s"
    )
    if summary.live and summary.startup_ms is not None:
        line += f"; live, first map after {summary.startup_ms / 1000:.1f} s"
    if summary.live and summary.latency_p50_ms is not None:
        line += (
            f", then latency p50 {summary.latency_p50_ms:.0f} ms, "
            f"p95 {summary.latency_p95_ms:.0f} ms"
        )
    if summary.stopped_by:
        line += f"; stopped by {summary.stopped_by}"
    return line


def batch_line(result: BatchResult, batch: BatchConfig) -> str:
    """Return the line that ends a batch: how many inputs were done, skipped, failed; how fast."""
    done, failed = result.with_status("done"), result.with_status("failed")
    skipped = result.with_status("skipped")
    rate = result.frames / result.seconds if result.seconds else 0.0
    line = f"{PROG}: {len(done)} done"
    if skipped:
        line += f", {len(skipped)} skipped (output exists; --overwrite redoes them)"
    line += (
        f", {len(failed)} failed of {len(result.records)} inputs; {result.frames} frames "
        f"in {result.seconds:.1f} s, {rate:.2f} frames/s"
    )
    if batch.summary:
        line += f"; summary in {batch.summary}"
    return line


def failure_table(failed: list[VideoRecord]) -> str:
    """Return the table of failed inputs and why, one row each."""
    width = max(len("input"), *(len(r.input) for r in failed))
    rows = [f"  {'input':<{width}}  reason"] + [f"  {r.input:<{width}}  {r.error}" for r in failed]
    return f"{PROG}: {len(failed)} input(s) failed:\n" + "\n".join(rows)
