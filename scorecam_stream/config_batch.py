"""The configuration of many inputs in one run (:mod:`scorecam_stream.batch`)."""

from __future__ import annotations

from dataclasses import dataclass

from .config_checks import require


@dataclass(frozen=True)
class BatchConfig:
    """Many inputs in one run (:mod:`scorecam_stream.batch`): where their outputs go.

    ``inputs``: as given (files, directories, glob patterns, URLs), expanded by the batch.
    ``output_dir``: each video's ``<stem>.scorecam.mp4`` goes there; None: beside its input.
    ``maps_dir`` / ``jsonl_dir`` / ``preview_dir``: ``--save-maps`` / ``--jsonl`` /
    ``--preview`` with a directory: ``<stem>.maps.npz`` / ``<stem>.jsonl`` /
    ``<stem>.preview.png`` there. ``summary``: one JSON record per video, written at the end.
    ``max_inflight_videos``: videos in progress at once; None: 2 with Ray workers, 1 in-process.
    ``video_tasks``: each video's decode -> encode loop runs as a Ray task on any node of the
    cluster (its paths must be reachable there), its frames explained by the shared workers.
    ``names``: live streams' names (``--name``, one per input, in order): ``<name>.m3u8``...
    """

    inputs: tuple[str, ...]
    output_dir: str | None = None
    maps_dir: str | None = None
    jsonl_dir: str | None = None
    preview_dir: str | None = None
    summary: str | None = None
    max_inflight_videos: int | None = None
    video_tasks: bool = False
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        require(
            isinstance(self.inputs, tuple) and len(self.inputs) > 0 and all(self.inputs),
            "no input given",
        )
        require(
            self.max_inflight_videos is None
            or (isinstance(self.max_inflight_videos, int) and self.max_inflight_videos >= 1),
            f"--max-inflight-videos must be >= 1, got {self.max_inflight_videos}",
        )
        bad = [n for n in self.names if not n or "/" in n or n.startswith(".")]
        require(not bad, f"--name {bad[0] if bad else ''}: a stream's name is a file name")

    def inflight_videos(self, uses_ray: bool) -> int:
        """Return how many videos run at once: as given, else 2 with Ray workers, else 1.

        Two with workers so that none idles while one video's decoder starts or its encoder
        finishes; one in-process, where the single model replica is the bottleneck anyway.
        """
        if self.max_inflight_videos is not None:
            return self.max_inflight_videos
        return 2 if uses_ray else 1
