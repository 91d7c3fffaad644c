"""Live sources: read at the source's pace, explain the newest frame, write every frame.

    reader thread (source pace) --> newest-frame slot --> explainer (takes the newest when free)
          |                                                   | map
          +--- every frame --> render with the latest map --> encoder (file / HLS / stream)

The reader never waits for the explainer and the explainer never queues old frames, so the
output is a real-time copy of the source with the freshest map, and its latency is one
frame's passes (spread over the Ray workers when there are several). Stopping (Ctrl-C,
SIGTERM, ``--duration``, a source that goes quiet for ``--read-timeout`` and cannot be
reopened) is the normal end: the outputs are finished and kept. A source that restarts or
reconnects plays on (:mod:`scorecam_stream.video.timeline`, :mod:`~.video.reconnect`).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import import_module

import numpy as np
import torch

from . import targets, video
from .annotate import frame_label
from .config import Config
from .config_video import RECONNECT_MAX_DELAY_S
from .errors import ScoreCamError
from .frame_loop import FrameSink, model_input, reuse_options
from .live_source import LiveSource
from .monitoring import RunCounts, RunMetrics
from .outputs import Outputs
from .records import FrameResult, FrameTask, Progress, RunSummary
from .stages import DrawItem, make_encoder
from .workers import Explainer

log = logging.getLogger(__name__)

_BACKLOG_BYTES = 512 << 20  # decoded frames waiting for the encoder, at most


@dataclass(frozen=True)
class _Map:
    """The latest map, as every written frame is drawn with it."""

    heat: np.ndarray
    result: FrameResult
    frame: video.Frame  # the frame it explains


class _RunningDominant:
    """Targets for ``--target dominant`` on a live source: the most frequent top-1 so far."""

    def __init__(self, explainer: Explainer) -> None:
        self._explainer = explainer
        self._counts = targets.TopCounts()

    def __call__(self, x: torch.Tensor) -> tuple[int, ...]:
        self._counts.add(self._explainer.classify(x[None]))
        return (self._counts.dominant(),)


def _backlog(info: video.VideoInfo) -> int:
    """Return how many decoded frames may wait for the encoder: ~10 s, at most 512 MiB."""
    frame_bytes = max(1, info.width * info.height * 3)
    return int(max(16, min(_BACKLOG_BYTES // frame_bytes, 10 * info.fps)))


def run_live(
    config: Config,
    reader: video.VideoReader,
    make_explainer: Callable[[], Explainer],
    outputs: Outputs,
    progress: Progress | None,
    stack: contextlib.ExitStack,
    metrics: RunMetrics | None = None,
    stop: threading.Event | None = None,
) -> RunSummary:
    """Explain a live source until it ends or is stopped; return the summary (output unset).

    ``metrics``: the run's Prometheus metrics, read from the same counts as the summary.
    ``stop``: when set (from any thread), the run stops as on Ctrl-C: outputs finished, kept.
    """
    w = config.window
    if config.distributed.uses_ray:
        # Importing Ray holds the interpreter for seconds: do it before the reader thread runs,
        # or its reads would look stalled past a short --read-timeout.
        import_module("scorecam_stream.distributed")
    # Restarts of the source (timestamps from 0 again) are discontinuities the output plays on;
    # a network input that breaks off or ends is reopened.
    timeline = video.Timeline(reader.info.fps, wall_clock=reader.live)
    live_input = video.ReconnectingInput(
        reader,
        lambda: video.VideoReader(
            reader.path, config.source.input_format, config.source.options, reader.read_timeout
        ),
        timeline,
        video.reconnect_attempts(reader.path, config.source.reconnect),
        config.source.reconnect_delay,
        RECONNECT_MAX_DELAY_S,
    )
    behind = threading.Event()
    # Reading starts before the model loads: the source does not wait, and neither do we.
    source = LiveSource(
        live_input.frames(w.start, w.end, w.max_frames),
        _backlog(reader.info),
        reader.read_timeout,
        w.duration,
        pace=not reader.live,
        reconnecting=lambda: live_input.reconnecting,
        on_behind=behind.set,  # the encoder takes a faster preset, before frames are dropped
    )
    stack.callback(_stop_reader, source, live_input)
    if stop is not None:
        _stop_when_set(stop, source, stack)
    if metrics is not None:  # frames come in while the model loads: no workers up yet
        metrics.track(
            lambda: RunCounts(
                frames_in=source.frames_in,
                frames_dropped=source.dropped,
                reconnects=live_input.reconnects,
            )
        )
    explainer = make_explainer()
    meta = explainer.meta
    description, fixed = targets.parse(config.explain.target, meta.class_names)
    dominant = _RunningDominant(explainer) if config.explain.target == "dominant" else None
    every = config.explain.every
    latest: list[_Map] = []  # the encoder thread reads the last one; appending is atomic

    def draw_items() -> Iterator[DrawItem]:
        for frame in source.output_frames():
            current = latest[-1] if latest else None
            if current is None:
                yield DrawItem(frame, None, "waiting for the first map")
                continue
            label = frame_label(meta, current.result, frame, reused=False)
            age = frame.seconds - current.frame.seconds
            yield DrawItem(frame, current.heat, f"{label}  (map {age:.1f} s old)")
            if len(latest) > 1:
                del latest[:-1]  # only the newest is ever read again

    def tasks() -> Iterator[tuple[video.Frame, FrameTask]]:
        wanted = 0
        while (frame := source.newest_after(wanted)) is not None:
            wanted = frame.index + every
            x = model_input(frame.image, meta)
            wanted_classes = dominant(x) if dominant is not None else fixed
            yield frame, FrameTask(frame.index, x, wanted_classes)

    encoder = make_encoder(config, reader, draw_items(), outputs, speed_up=behind)
    sink = FrameSink(config, meta, outputs)
    latencies: list[float] = []
    previous = -1

    def counts() -> RunCounts:
        return RunCounts(
            frames_in=source.frames_in,
            frames_written=encoder.frames,
            frames_explained=len(latencies),
            frames_dropped=source.dropped,
            reconnects=live_input.reconnects,
            workers_alive=explainer.workers_up(),
        )

    if metrics is not None:
        metrics.track(counts)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C, SIGTERM: the normal stop
            for frame, result in explainer.explain(tasks(), reuse_options(config, live=True)):
                assert result is not None
                latency_ms = (time.monotonic() - frame.arrival) * 1000
                heat, scores = sink.add(result, frame)
                latest.append(_Map(heat, result, frame))
                if metrics is not None:
                    metrics.observe_latency(latency_ms / 1000)
                latencies.append(latency_ms)
                arrival = {
                    "latency_ms": round(latency_ms, 3),
                    "skipped_frames": frame.index - previous - 1,
                    "discontinuity": _broken(timeline, previous, frame.index),
                }
                sink.record(result, frame, reused=False, fields={**arrival, **scores})
                previous = frame.index
                if progress is not None:
                    progress(len(latencies), None)
                encoder.alive()
        if not source.ended:
            source.stop("signal")
        encoder.finish()
        if encoder.frames == 0:
            raise ScoreCamError(f"no frames decoded from {config.input}")
        outputs.close()
    except BaseException:
        source.stop("error")
        encoder.abort()
        outputs.abort()
        raise
    reason = source.end_reason
    if not source.stopped:  # else: stopped by us, whatever the reader saw as it was stopped
        if live_input.gave_up:
            reason = "reconnect failed"
        elif live_input.timed_out:
            reason = "read timeout"
    if source.dropped:
        log.warning("%d output frames were dropped: the encoder fell behind", source.dropped)
    # The first map also waited for the model (or Ray): start-up, apart from the steady state.
    steady = latencies[1:]
    p50, p95 = (
        (float(np.percentile(steady, 50)), float(np.percentile(steady, 95)))
        if steady
        else (None, None)
    )
    summary = RunSummary(
        output=str(outputs.video),
        frames=encoder.frames,
        explained=len(latencies),
        seconds=0.0,
        target=description,
        live=True,
        stopped_by=reason,
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        startup_ms=latencies[0] if latencies else None,
        **sink.summary_parts(),
    )
    final = counts()
    if metrics is not None:
        # The reader may still be stuck in a read; what the summary says is what is served.
        metrics.track(lambda: final)
    if outputs.records is not None:
        record = _summary_record(summary, final, len(timeline.discontinuities))
        outputs.records.add({"summary": {**record, **sink.summary_fields()}})
    return summary


def _broken(timeline: video.Timeline, previous: int, index: int) -> bool:
    """Return whether a discontinuity came in frames (previous, index]."""
    at = bisect.bisect_right(timeline.discontinuities, previous)
    return at < len(timeline.discontinuities) and timeline.discontinuities[at] <= index


def _summary_record(
    summary: RunSummary, counts: RunCounts, discontinuities: int
) -> dict[str, object]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return {
        "live": True,
        "frames_in": counts.frames_in,
        "frames_written": counts.frames_written,
        "frames_explained": counts.frames_explained,
        "frames_dropped": counts.frames_dropped,
        "discontinuities": discontinuities,
        "reconnects": counts.reconnects,
        "latency_p50_ms": ms(summary.latency_p50_ms),
        "latency_p95_ms": ms(summary.latency_p95_ms),
        "startup_ms": ms(summary.startup_ms),
        "stopped_by": summary.stopped_by,
    }


def _stop_when_set(stop: threading.Event, source: LiveSource, stack: contextlib.ExitStack) -> None:
    """Stop ``source`` (as a signal does) once ``stop`` is set, until ``stack`` closes."""
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if stop.wait(0.1):
                source.stop("signal")
                return

    watcher = threading.Thread(target=watch, daemon=True, name="stop-watch")
    watcher.start()
    stack.callback(watcher.join, 5)
    stack.callback(done.set)


def _stop_reader(source: LiveSource, live_input: video.ReconnectingInput) -> None:
    """Stop the reader thread; leave the input open if it is stuck in a read."""
    live_input.stop()
    source.stop("end")
    if not source.join(timeout=5):
        path = live_input.reader.path
        log.debug("the reader is blocked in a read; leaving %s open until exit", path)
        live_input.reader.detach()
    else:
        live_input.close()  # a reopened input (the first one is closed by its opener too)
