"""The file loop: every frame of the window in order, decode -> explain -> render -> encode.

The file is read as fast as the explainer goes; memory is bounded by the hand-over queues and
the explainer's in-flight frames, whatever the video's length. ``--target dominant`` costs one
classification pass over the window before the loop.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from . import targets, video
from .annotate import frame_label
from .config import Config
from .errors import ScoreCamError
from .frame_loop import FrameSink, model_input, reuse_options
from .outputs import Outputs
from .records import FrameResult, FrameTask, Progress, RunSummary
from .stages import DrawItem, Handoff, make_encoder, produce
from .workers import Explainer

log = logging.getLogger(__name__)

_CLASSIFY_BATCH = 32  # frames per forward when counting the dominant class


def run_file(
    config: Config,
    reader: video.VideoReader,
    explainer: Explainer,
    outputs: Outputs,
    progress: Progress | None = None,
) -> RunSummary:
    """Explain the window of a file (or still image); return the summary (output and time unset).

    On any error the outputs are aborted (nothing half-written is kept) and the error raised.
    """
    description, fixed = resolve_target(config, reader, explainer)
    sink = FrameSink(config, explainer.meta, outputs)
    frames = _process(config, reader, explainer, fixed, outputs, sink, progress)
    log.info(
        "wrote %s: %d frames (%d explained; %s)",
        outputs.video_name,
        frames,
        sink.explained,
        sink.tally.summary(),
    )
    return RunSummary(
        output=outputs.video_name,
        frames=frames,
        explained=sink.explained,
        seconds=0.0,
        target=description,
        **sink.summary_parts(),
    )


def window_frames(config: Config, reader: video.VideoReader) -> Iterator[video.Frame]:
    """Return the frames of the configured window (``--duration`` counted from the first)."""
    w = config.window
    frames = reader.frames(start=w.start, end=w.end, max_frames=w.max_frames)
    if w.duration is None:
        return frames
    first: list[float] = []

    def within(frame: video.Frame) -> bool:
        if not first:
            first.append(frame.seconds)
        return frame.seconds - first[0] < w.duration  # type: ignore[operator]

    return itertools.takewhile(within, frames)


def resolve_target(
    config: Config, reader: video.VideoReader, explainer: Explainer
) -> tuple[str, tuple[int, ...] | None]:
    """Return (description, fixed classes or None for each frame's top-k) of a file run."""
    wanted = config.explain.target
    names = explainer.meta.class_names
    if wanted != "dominant":
        return targets.parse(wanted, names)
    counts = _count_top_classes(config, reader, explainer)
    best = counts.dominant()
    name = targets.class_name(names, best)
    log.info("dominant class %d (%s): top-1 in %d frames", best, name, counts.counts[best])
    return f"dominant: {name}", (best,)


def _count_top_classes(
    config: Config, reader: video.VideoReader, explainer: Explainer
) -> targets.TopCounts:
    """Return how often each class is top-1 over the frames in the window (one forward each)."""
    meta = explainer.meta
    counts = targets.TopCounts()
    batch: list[torch.Tensor] = []
    for frame in window_frames(config, reader):
        batch.append(model_input(frame.image, meta))
        if len(batch) == _CLASSIFY_BATCH:
            counts.add(explainer.classify(torch.stack(batch)))
            batch.clear()
    if batch:
        counts.add(explainer.classify(torch.stack(batch)))
    if not counts.frames:
        raise ScoreCamError(f"no frames to classify in {config.input}")
    return counts


def _process(
    config: Config,
    reader: video.VideoReader,
    explainer: Explainer,
    fixed: tuple[int, ...] | None,
    outputs: Outputs,
    sink: FrameSink,
    progress: Progress | None,
) -> int:
    """Run decode -> explain -> render -> encode; return the number of frames written."""
    reuse = reuse_options(config, live=False)
    meta = explainer.meta
    every = config.explain.every
    total = _expected_frames(config, reader.info)
    decoded = produce(window_frames(config, reader), name="decode")

    def tasks() -> Iterator[tuple[video.Frame, FrameTask | None]]:
        for frame in decoded:
            if frame.index % every == 0:
                yield frame, FrameTask(frame.index, model_input(frame.image, meta), fixed)
            else:
                yield frame, None

    drawn: Handoff[DrawItem] = Handoff()
    encoder = make_encoder(config, reader, drawn, outputs)
    latest: FrameResult | None = None
    heat: np.ndarray | None = None
    scores: dict[str, Any] = {}  # --metrics: the latest explained frame's record fields
    done = 0
    try:
        for frame, result in explainer.explain(tasks(), reuse):
            if result is not None:
                latest = result
                heat, scores = sink.add(result, frame)
            assert latest is not None and heat is not None  # frame 0 is always explained
            sink.record(latest, frame, reused=result is None, fields=scores)
            label = frame_label(meta, latest, frame, reused=result is None)
            if not drawn.put(DrawItem(frame, heat, label)):
                encoder.alive()  # the encoder stopped: raise its error
            done += 1
            if progress is not None:
                progress(done, total)
        drawn.end()
        if done == 0:
            raise ScoreCamError(f"no frames decoded from {config.input} in the time window")
        encoder.finish(reader.trailing_audio)
        if outputs.records is not None and (sink.evaluator is not None or not reuse.exact):
            # The last line; the same {"summary": {...}} line as the live mode's.
            summary = {"frames": done, "explained": sink.explained, **sink.summary_fields()}
            outputs.records.add({"summary": summary})
        outputs.close()
    except BaseException:
        drawn.close()
        encoder.abort()
        outputs.abort()
        raise
    finally:
        decoded.close()
    return done


def _expected_frames(config: Config, info: video.VideoInfo) -> int | None:
    """Return the number of frames the window should hold, when it can be known."""
    w = config.window
    count = info.frame_count
    if count is None and info.duration:
        count = round(info.duration * info.fps)
    if count is not None and (w.start or w.end):
        span = (w.end if w.end is not None else (info.duration or 0)) - (w.start or 0)
        count = max(0, round(span * info.fps))
    if count is not None and w.duration is not None:
        count = min(count, round(w.duration * info.fps))
    if w.max_frames is not None:
        count = min(count, w.max_frames) if count is not None else w.max_frames
    return count
