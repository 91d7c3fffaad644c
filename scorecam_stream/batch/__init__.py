"""Many videos in one run: inputs expanded, outputs named, finished ones skipped, one explainer.

The explainer (the model replica in-process, or the Ray workers and their replicas) is built
once and lent to every video's :func:`~scorecam_stream.pipeline.run`; up to
``max_inflight_videos`` videos run at once, each in a thread of its own, so the workers have
frames to explain while one video's decoder starts or another's encoder finishes. A video that
fails (missing, not a video, broken) is recorded with its one-line reason and the others go on;
an interrupt stops them all, and what each video writes appears only when it is whole (see
:func:`~scorecam_stream.pipeline.run`), so a re-run skips the finished videos and redoes the
rest. Several live streams run together instead, each until it ends or the run is stopped
(:mod:`~scorecam_stream.batch.streams`). No argv here: :mod:`scorecam_stream.cli` builds the
:class:`BatchConfig`.
"""

from .jobs import (
    OUTPUT_MARK,
    VIDEO_EXTENSIONS,
    Job,
    all_live,
    config_for,
    expand_inputs,
    is_glob,
    plan_jobs,
    with_batch_defaults,
)
from .records import BatchProgress, BatchResult, SummaryWriter, VideoRecord
from .runner import BatchStopped, run_batch, run_job, run_video_task
from .shared import FairLock, SharedExplainer
from .streams import plan_streams, run_streams, stream_name

__all__ = [
    "OUTPUT_MARK",
    "VIDEO_EXTENSIONS",
    "BatchProgress",
    "BatchResult",
    "BatchStopped",
    "FairLock",
    "Job",
    "SharedExplainer",
    "SummaryWriter",
    "VideoRecord",
    "all_live",
    "config_for",
    "expand_inputs",
    "is_glob",
    "plan_jobs",
    "plan_streams",
    "run_batch",
    "run_job",
    "run_streams",
    "run_video_task",
    "stream_name",
    "with_batch_defaults",
]
