"""A batch's inputs and outputs: inputs expanded, each video's job and paths, its Config."""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import video
from ..config import Config
from ..config_batch import BatchConfig
from ..errors import ScoreCamError
from ..pipeline import default_output
from ..video import is_glob

# What a directory's videos are: these extensions, case-insensitive.
VIDEO_EXTENSIONS = frozenset(
    {
        ".3gp",
        ".avi",
        ".flv",
        ".m2ts",
        ".m4v",
        ".mkv",
        ".mov",
        ".mp4",
        ".mpeg",
        ".mpg",
        ".mts",
        ".ogv",
        ".ts",
        ".webm",
        ".wmv",
    }
)
OUTPUT_MARK = ".scorecam."  # this tool's outputs: never taken as inputs from a directory or glob
# --- inputs and outputs ----------------------------------------------------------------------


def _takeable(path: Path) -> bool:
    """Return whether a file found in a directory or by a glob is an input (not hidden, not
    one of this tool's outputs)."""
    return path.is_file() and not path.name.startswith(".") and OUTPUT_MARK not in path.name


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Return the inputs that ``items`` name, in order, each once.

    A directory gives its video files (by :data:`VIDEO_EXTENSIONS`, not recursive) sorted by
    name; a glob pattern that is not an existing path gives its matching files sorted (``**``
    recursive); a URL, ``-`` or any other path is taken as given (a missing file fails later,
    as that video's failure). Hidden files and this tool's outputs (``*.scorecam.*``) are left
    out of directories and globs. A directory without videos or a pattern without matches is a
    mistake (ScoreCamError).
    """
    found: list[str] = []
    for item in items:
        if item == video.STDIN or video.is_url(item):
            found.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            videos = sorted(
                p for p in path.iterdir() if _takeable(p) and p.suffix.lower() in VIDEO_EXTENSIONS
            )
            if not videos:
                raise ScoreCamError(
                    f"no videos in directory {item} (files ending with "
                    f"{', '.join(sorted(VIDEO_EXTENSIONS))})"
                )
            found += [str(p) for p in videos]
        elif not path.exists() and is_glob(item):
            matches = sorted(m for m in glob.glob(item, recursive=True) if _takeable(Path(m)))
            if not matches:
                raise ScoreCamError(f"no file matches {item}")
            found += matches
        else:
            found.append(item)
    seen: set[str] = set()
    unique = []
    for item in found:
        key = item if item == video.STDIN or video.is_url(item) else os.path.realpath(item)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


@dataclass(frozen=True)
class Job:
    """One video of a batch: its input and the paths it writes (None: not asked for)."""

    input: str
    output: Path
    save_maps: Path | None = None
    jsonl: Path | None = None
    preview: Path | None = None

    def paths(self) -> Iterator[Path]:
        """Yield every path this video writes."""
        for path in (self.output, self.save_maps, self.jsonl, self.preview):
            if path is not None:
                yield path


def plan_jobs(inputs: Sequence[str], batch: BatchConfig) -> list[Job]:
    """Return each input's job, its outputs named after the input's stem.

    ``<stem>.scorecam.mp4`` (``.png`` for an image) in ``batch.output_dir``, or beside the
    input; side outputs ``<stem>.maps.npz``, ``<stem>.jsonl``, ``<stem>.preview.png`` in their
    directories. Two inputs that would write the same file are a mistake (ScoreCamError naming
    both), never a silent overwrite.
    """
    jobs = []
    writers: dict[str, str] = {}  # absolute output path -> the input that writes it
    for item in inputs:
        is_image = Path(item).suffix.lower() in video.IMAGE_CODECS and not video.is_url(item)
        beside = default_output(item, is_image)
        stem = beside.name.split(OUTPUT_MARK)[0]
        out_dir = batch.output_dir
        job = Job(
            input=item,
            output=Path(out_dir) / beside.name if out_dir else beside,
            save_maps=Path(batch.maps_dir) / f"{stem}.maps.npz" if batch.maps_dir else None,
            jsonl=Path(batch.jsonl_dir) / f"{stem}.jsonl" if batch.jsonl_dir else None,
            preview=Path(batch.preview_dir) / f"{stem}.preview.png" if batch.preview_dir else None,
        )
        for path in job.paths():
            key = os.path.abspath(path)
            if key in writers:
                raise ScoreCamError(
                    f"{writers[key]} and {item} would both write {path}; "
                    "rename one or run them separately"
                )
            writers[key] = item
        jobs.append(job)
    return jobs


def all_live(inputs: Sequence[str], config: Config) -> bool:
    """Return True if every input is read live (network streams, ``-``, devices), False if none.

    Raises ScoreCamError for a mix: live streams run together, files run as a batch.
    """
    source = config.source

    def live(item: str) -> bool:
        if source.live is not None:
            return source.live
        return video.is_live_source(item, source.input_format)

    found = [item for item in inputs if live(item)]
    if found and len(found) < len(inputs):
        raise ScoreCamError(
            f"{found[0]} is read live and other inputs are files: run live streams and files "
            "separately"
        )
    return bool(found)


def with_batch_defaults(base: Config, videos: int) -> Config:
    """Return ``base`` with whole frames per Ray worker (``--shards-per-frame 1``) when the
    videos to do are at least as many as the workers and no shard count was given.

    Splitting a frame over the workers lowers one frame's latency, which a batch does not
    need; whole frames save every worker's base forward of every frame and all but one call
    per frame, while enough frames (and videos) are in flight to keep every worker busy.
    """
    dist = base.distributed
    if not dist.uses_ray or dist.shards_per_frame is not None or videos < dist.num_workers:
        return base
    return dataclasses.replace(base, distributed=dataclasses.replace(dist, shards_per_frame=1))


def make_output_dirs(batch: BatchConfig) -> None:
    """Create the directories the batch's outputs go to (those given)."""
    for directory in (batch.output_dir, batch.maps_dir, batch.jsonl_dir, batch.preview_dir):
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)


def config_for(base: Config, job: Job) -> Config:
    """Return the Config of one video of the batch: the shared settings, its input, its paths."""

    def name(path: Path | None) -> str | None:
        return None if path is None else str(path)

    output = dataclasses.replace(
        base.output,
        output=str(job.output),
        save_maps=name(job.save_maps),
        jsonl=name(job.jsonl),
        preview=name(job.preview),
    )
    return dataclasses.replace(base, input=job.input, output=output)


def absolute_job(job: Job) -> Job:
    """Return ``job`` with absolute paths (a URL or ``-`` input stays as it is)."""

    def absolute(path: Path | None) -> Path | None:
        return None if path is None else Path(os.path.abspath(path))

    keep = job.input == video.STDIN or video.is_url(job.input)
    return Job(
        input=job.input if keep else os.path.abspath(job.input),
        output=Path(os.path.abspath(job.output)),
        save_maps=absolute(job.save_maps),
        jsonl=absolute(job.jsonl),
        preview=absolute(job.preview),
    )
