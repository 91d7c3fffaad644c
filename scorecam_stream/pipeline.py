"""Wires the stages: decode -> preprocess -> explain -> render -> encode, plus side outputs.

The input is opened once (one :class:`~scorecam_stream.video.VideoReader` session). A file is
read frame by frame as fast as the explainer goes (:func:`_process`); a live source is read at
its own pace and the explainer takes the newest frame whenever it is free
(:mod:`scorecam_stream.live`). Frames stay in order end to end; memory is bounded by the
hand-over queues and the explainer's in-flight frames, whatever the input's length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import numpy as np
import torch

from . import video
from .annotate import MapDisplay, class_name, fixed_target, frame_label, frame_record
from .config import Config
from .errors import ScoreCamError
from .evaluation import Evaluator, format_table, make_evaluator
from .models import resize_frame
from .monitoring import RunMetrics, serve_metrics, stream_label
from .outputs import MapsWriter, PreviewSampler, RecordsWriter
from .render import RenderOptions
from .reuse import ReuseOptions, ReuseTally
from .stages import Channel, DrawItem, Encoder, produce
from .workers import Explainer, FrameResult, FrameTask, LocalExplainer, ModelMeta, Worker

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class RunSummary:
    """What a run produced."""

    output: Path | str
    frames: int  # frames written
    explained: int  # frames whose map was computed (the others reuse one)
    seconds: float  # wall time of the whole run
    target: str  # the target policy, or the class explained in every frame
    live: bool = False
    stopped_by: str | None = None  # live runs: "signal", "duration", "read timeout", None (end)
    latency_p50_ms: float | None = None  # live runs: frame arrival -> its map ready
    latency_p95_ms: float | None = None
    metrics: dict[str, Any] | None = None  # --metrics: each method's means (evaluation.py)
    cost: dict[str, Any] | None = None  # masked passes per explained frame, fidelity (reuse.py)
    metrics_table: str | None = None  # the same as a text table


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


def default_output(input_path: str, is_image: bool) -> Path:
    """Return ``<input stem>.scorecam.mp4`` (``.png`` for images) beside the input."""
    suffix = ".scorecam.png" if is_image else ".scorecam.mp4"
    if input_path == video.STDIN:
        return Path(f"stdin{suffix}")
    if "://" in input_path:  # a stream: name it after the URL's last path part, in the cwd
        stem = Path(urlparse(input_path).path).stem or "stream"
        return Path(f"{stem}{suffix}")
    path = Path(input_path)
    return path.with_name(path.stem + suffix)


def make_explainer(config: Config) -> Explainer:
    """Return the in-process explainer, or the Ray one when workers/GPUs/address are given."""
    topk = config.explain.topk
    evaluation = config.evaluation  # --metrics: the workers score their maps too
    if config.distributed.distributed:
        from .distributed import RayExplainer  # only imported (with ray) when asked for

        return RayExplainer(
            config.model, config.engine, config.distributed, topk, evaluation=evaluation
        )
    return LocalExplainer(Worker(config.model, config.engine, evaluation=evaluation), topk)


def reuse_options(config: Config, live: bool) -> ReuseOptions:
    """Return how a run's stream reuses masked passes: ``--fidelity``, else the default.

    Files are exact by default; live runs reuse (a map sooner is the point of them), except
    with ``--max-channels``, whose channel selection changes from frame to frame.
    """
    if config.explain.fidelity is None and config.engine.max_channels is not None:
        return ReuseOptions()
    return ReuseOptions(fidelity=config.explain.fidelity_for(live))


def _read_timeout(config: Config, live: bool) -> float | None:
    given = config.source.read_timeout
    return given if given is not None or not live else video.LIVE_READ_TIMEOUT_S


def run(
    config: Config,
    progress: Progress | None = None,
    explainer_factory: Callable[[Config], Explainer] = make_explainer,
) -> RunSummary:
    """Explain the frames of ``config.input`` and write the annotated output; return a summary.

    Every file output is written to a temporary file beside it and moved into place only when
    the whole run succeeded: a failed or interrupted run leaves nothing half-written. A live
    run stopped by Ctrl-C, SIGTERM or ``--duration`` finishes its outputs and succeeds; its
    records (``--jsonl``) are written in place as they are made, so they can be followed.
    """
    began = time.perf_counter()
    source = config.source
    guess_live = video.is_live_source(config.input, source.input_format)
    live = source.live if source.live is not None else guess_live
    # Before the input opens, the model loads or Ray starts: a bad output path fails at once.
    # A live run makes its outputs' missing directories (-o live/cam.m3u8).
    video.check_output_dirs(config.output.paths, create=live)
    with contextlib.ExitStack() as stack:
        # Listening first too: a port in use fails at once, and the run is watched from start.
        metrics = _serve_metrics(config, live, stack)
        reader = video.VideoReader(
            config.input, source.input_format, source.options, _read_timeout(config, live)
        )
        stack.callback(reader.close)
        info = reader.info
        out = config.output
        target = out.output or str(default_output(config.input, info.is_image))
        kind = _output_kind(target, info.is_image)
        # Claim every output first: an existing file without --overwrite fails before any work.
        claimed = {
            name: stack.enter_context(video.atomic_output(path, out.overwrite))
            for name, path in (
                ("video", target if kind == "file" else None),
                ("maps", out.save_maps),
                ("jsonl", None if live else out.jsonl),  # a live run's records: see below
                ("preview", out.preview),
            )
            if path
        }
        if kind == "hls" and Path(target).exists() and not out.overwrite:
            raise ScoreCamError(f"output {target} exists; pass --overwrite")
        if live and out.jsonl:
            # Written in place, each record flushed as it is made: `tail -f` follows a live
            # run, and a killed one keeps what it recorded.
            claimed["jsonl"] = video.visible_output(out.jsonl, out.overwrite)
        outputs = Outputs(
            video=claimed.get("video", None if kind == "file" else target),
            video_name=target,
            image=info.is_image,
            maps=(
                MapsWriter(claimed["maps"], Path(out.save_maps).parent) if out.save_maps else None
            ),
            records=RecordsWriter(claimed["jsonl"]) if "jsonl" in claimed else None,
            preview=PreviewSampler() if "preview" in claimed else None,
            preview_path=claimed.get("preview"),
            preview_name=out.preview,
        )
        if outputs.records is not None:
            stack.callback(outputs.records.close)
        if live:
            from .live import run_live

            if config.distributed.distributed:
                # One frame in flight: its passes spread over every worker, so its map is
                # ready soonest; the next frame is the newest one when this one is done.
                config = dataclasses.replace(
                    config,
                    distributed=dataclasses.replace(config.distributed, max_inflight_frames=1),
                )
            live_config = config
            summary = run_live(
                config,
                reader,
                lambda: explainer_factory(live_config),
                outputs,
                progress,
                stack,
                metrics,
            )
            return dataclasses.replace(summary, output=target, seconds=time.perf_counter() - began)
        explainer = explainer_factory(config)
        stack.callback(explainer.close)
        description, fixed = _resolve_target(config, reader, explainer)
        evaluator = make_evaluator(config)
        tally = ReuseTally()
        frames, explained = _process(
            config, reader, explainer, fixed, outputs, progress, evaluator, tally
        )
    faithfulness = evaluator.summary() if evaluator is not None else None
    log.info("wrote %s: %d frames (%d explained; %s)", target, frames, explained, tally.summary())
    return RunSummary(
        output=Path(target),
        frames=frames,
        explained=explained,
        seconds=time.perf_counter() - began,
        target=description,
        metrics=faithfulness,
        metrics_table=format_table(faithfulness) if faithfulness else None,
        cost=tally.summary(),
    )


def _serve_metrics(config: Config, live: bool, stack: contextlib.ExitStack) -> RunMetrics | None:
    """Return the run's Prometheus metrics, served until ``stack`` closes (live runs only)."""
    monitoring = config.monitoring
    if monitoring.prometheus_port is None:
        return None
    if not live:
        log.warning("--prometheus-port: metrics are served for live runs only; none for this one")
        return None
    metrics, server = serve_metrics(monitoring, stream_label(config.input))
    stack.callback(server.close)
    return metrics


def _output_kind(target: str, is_image: bool) -> str:
    if is_image:
        if Path(target).suffix.lower() not in video.IMAGE_CODECS:
            allowed = ", ".join(video.IMAGE_CODECS)
            raise ScoreCamError(f"output {target}: an image input gives an image; use {allowed}")
        return "file"
    return video.output_kind(target)


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


def _resolve_target(
    config: Config, reader: video.VideoReader, explainer: Explainer
) -> tuple[str, tuple[int, ...] | None]:
    """Return (description, fixed classes or None for each frame's top-k)."""
    wanted = config.explain.target
    names = explainer.meta.class_names
    if wanted == "dominant":
        counts = _classify_all(config, reader, explainer)
        best = int(np.argmax(counts))
        log.info(
            "dominant class %d (%s): top-1 in %d frames",
            best,
            class_name(names, best),
            counts[best],
        )
        return f"dominant: {class_name(names, best)}", (best,)
    return fixed_target(wanted, names)


def _classify_all(config: Config, reader: video.VideoReader, explainer: Explainer) -> np.ndarray:
    """Return how often each class is top-1 over the frames in the window (one forward each)."""
    meta = explainer.meta
    counts: np.ndarray | None = None
    batch: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal counts
        logits = explainer.classify(torch.stack(batch))
        counts = np.bincount(logits.argmax(1).numpy(), minlength=logits.shape[1]) + (
            0 if counts is None else counts
        )
        batch.clear()

    for frame in window_frames(config, reader):
        batch.append(model_input(frame.image, meta))
        if len(batch) == 32:
            flush()
    if batch:
        flush()
    if counts is None:
        raise ScoreCamError(f"no frames to classify in {config.input}")
    return counts


def model_input(image: np.ndarray, meta: ModelMeta) -> torch.Tensor:
    """Return what travels to the worker for a decoded frame: (S, S, 3) uint8, resized.

    A quarter of the bytes of the float input; the worker normalises it on its device.
    """
    return torch.from_numpy(resize_frame(image, meta.input_size, meta.fit))


def render_options(config: Config) -> RenderOptions:
    """Return how maps are drawn in this run."""
    out = config.output
    return RenderOptions(
        layout=out.layout, colormap=out.colormap, alpha=out.alpha, fit=config.model.fit
    )


def open_writer(
    config: Config, reader: video.VideoReader, path: Path | str, name: str
) -> Callable[[np.ndarray], video.VideoWriter]:
    """Return a function that opens the video writer for the first rendered image."""
    info, w, out = reader.info, config.window, config.output

    def opener(image: np.ndarray) -> video.VideoWriter:
        audio_end = w.end
        if w.max_frames is not None:
            # Audio stops with the last frame: the window's start plus max_frames at the rate.
            cap = (w.start or info.start_time) + w.max_frames / info.fps
            audio_end = cap if audio_end is None else min(audio_end, cap)
        return video.VideoWriter(
            str(path),
            image.shape[1],
            image.shape[0],
            info.time_base,
            info.fps,
            crf=out.crf,
            audio=reader.audio_stream,
            audio_start=w.start,
            audio_end=audio_end,
            time_offset=w.start or 0.0,
            hls_time=out.hls_time,
            hls_list_size=out.hls_list_size,
            name=name,
        )

    return opener


def make_encoder(
    config: Config,
    reader: video.VideoReader,
    items: Channel[DrawItem] | Iterator[DrawItem],
    outputs: Outputs,
    speed_up: threading.Event | None = None,
) -> Encoder:
    """Return the render -> encode thread of a run, writing to ``outputs.video``.

    ``speed_up``: set when the encoder falls behind a live source (see :class:`Encoder`).
    """
    path, name = outputs.video, outputs.video_name
    return Encoder(
        items,
        render_options(config),
        open_writer(config, reader, path, name) if path is not None and not outputs.image else None,
        image=(Path(path), name) if path is not None and outputs.image else None,
        preview=outputs.preview,
        size=config.output.output_size,
        speed_up=speed_up,
    )


def _process(
    config: Config,
    reader: video.VideoReader,
    explainer: Explainer,
    fixed: tuple[int, ...] | None,
    outputs: Outputs,
    progress: Progress | None,
    evaluator: Evaluator | None = None,
    tally: ReuseTally | None = None,
) -> tuple[int, int]:
    """Run decode -> explain -> render -> encode; return (frames written, frames explained).

    ``tally`` counts what the explained frames cost (masked passes, reuse, fidelity).
    """
    tally = tally if tally is not None else ReuseTally()
    reuse = reuse_options(config, live=False)
    meta = explainer.meta
    every = config.explain.every
    total = _expected_frames(config, reader.info)
    display = MapDisplay(config.explain.smooth, config.output.scale)
    decoded = produce(window_frames(config, reader), name="decode")

    def tasks() -> Iterator[tuple[video.Frame, FrameTask | None]]:
        for frame in decoded:
            explain = frame.index % every == 0
            x = model_input(frame.image, meta) if explain else None
            yield frame, (FrameTask(frame.index, cast(torch.Tensor, x), fixed) if explain else None)

    drawn: Channel[DrawItem] = Channel()
    encoder = make_encoder(config, reader, drawn, outputs)
    latest: FrameResult | None = None
    heat: np.ndarray | None = None
    scores: dict[str, Any] = {}  # --metrics: the latest explained frame's record fields
    done = explained = 0
    try:
        for frame, result in explainer.explain(tasks(), reuse):
            if result is not None:
                latest, explained = result, explained + 1
                tally.add(result)
                heat = display(result)
                add_maps(config, outputs, result, frame)
                if evaluator is not None:
                    scores = evaluator.add(result)
            assert latest is not None and heat is not None  # frame 0 is always explained
            label = frame_label(meta, latest, frame, reused=result is None)
            if outputs.records is not None:
                record = frame_record(meta, latest, frame, reused=result is None)
                outputs.records.add({**record, **scores})
            if not drawn.put(DrawItem(frame, heat, label)):
                encoder.alive()  # the encoder stopped: raise its error
            done += 1
            if progress is not None:
                progress(done, total)
        drawn.end()
        if done == 0:
            raise ScoreCamError(f"no frames decoded from {config.input} in the time window")
        encoder.finish(reader.trailing_audio)
        if outputs.records is not None and (evaluator is not None or not reuse.exact):
            # The last line; the same {"summary": {...}} line as the live mode's.
            summary: dict[str, Any] = {"frames": done, "explained": explained}
            summary.update(tally.summary())
            summary.update(evaluator.summary() if evaluator is not None else {})
            outputs.records.add({"summary": summary})
        outputs.close()
    except BaseException:
        drawn.close()
        encoder.abort()
        outputs.abort()
        raise
    finally:
        decoded.close()
    return done, explained


def add_maps(config: Config, outputs: Outputs, result: FrameResult, frame: video.Frame) -> None:
    """Append an explained frame's maps to the npz output, if any."""
    if outputs.maps is None:
        return
    many = config.explain.topk > 1
    maps = result.maps if many else result.maps[0]
    targets = result.targets if many else result.targets[0]
    outputs.maps.add(maps, targets, frame.seconds)


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
