"""Wires the stages: decode -> preprocess -> explain -> render -> encode, plus side outputs.

Decoding and encoding run in their own threads with bounded queues, so they overlap with the
explainer (PyAV, OpenCV and torch release the GIL). Frames stay in order end to end; memory is
bounded by the queues and the explainer's in-flight frames, whatever the video's length.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from . import video
from .config import Config
from .errors import ScoreCamError
from .models import resize_frame
from .outputs import MapsWriter, PreviewSampler, RecordsWriter
from .render import MapScaler, RenderOptions, render_frame
from .workers import Explainer, FrameResult, FrameTask, LocalExplainer, ModelMeta, Worker

log = logging.getLogger(__name__)

QUEUE_FRAMES = 8  # decoded frames waiting for the explainer, rendered frames for the encoder
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class RunSummary:
    """What a run produced."""

    output: Path
    frames: int  # frames written
    explained: int  # frames whose map was computed (the others reuse one, --every)
    seconds: float  # wall time of the whole run
    target: str  # the target policy, or the class explained in every frame


def default_output(input_path: str, is_image: bool) -> Path:
    """Return ``<input stem>.scorecam.mp4`` (``.png`` for images) beside the input."""
    suffix = ".scorecam.png" if is_image else ".scorecam.mp4"
    if "://" in input_path:  # a stream: name it after the URL's last path part, in the cwd
        stem = Path(urlparse(input_path).path).stem or "stream"
        return Path(f"{stem}{suffix}")
    path = Path(input_path)
    return path.with_name(path.stem + suffix)


def make_explainer(config: Config) -> Explainer:
    """Return the in-process explainer, or the Ray one when workers/GPUs/address are given."""
    topk = config.explain.topk
    if config.distributed.distributed:
        from .distributed import RayExplainer  # only imported (with ray) when asked for

        return RayExplainer(config.model, config.engine, config.distributed, topk)
    return LocalExplainer(Worker(config.model, config.engine), topk)


def run(
    config: Config,
    progress: Progress | None = None,
    explainer_factory: Callable[[Config], Explainer] = make_explainer,
) -> RunSummary:
    """Explain every frame of ``config.input`` and write the annotated output; return a summary.

    Every output is written to a temporary file beside it and moved into place only when the
    whole run succeeded: a failed or interrupted run leaves nothing half-written.
    """
    began = time.perf_counter()
    info = video.probe(config.input)
    out = config.output
    output = Path(out.output) if out.output else default_output(config.input, info.is_image)
    _check_output_kind(output, info.is_image)
    with contextlib.ExitStack() as stack:
        # Claim every output first: an existing file without --overwrite fails before any work.
        paths = {
            name: stack.enter_context(video.atomic_output(path, out.overwrite))
            for name, path in (
                ("video", output),
                ("maps", out.save_maps),
                ("jsonl", out.jsonl),
                ("preview", out.preview),
            )
            if path
        }
        explainer = explainer_factory(config)
        stack.callback(explainer.close)
        target, fixed = _resolve_target(config, info, explainer)
        frames, explained = _process(config, info, explainer, fixed, paths, progress)
    log.info("wrote %s: %d frames (%d explained)", output, frames, explained)
    return RunSummary(
        output=output,
        frames=frames,
        explained=explained,
        seconds=time.perf_counter() - began,
        target=target,
    )


def _check_output_kind(output: Path, is_image: bool) -> None:
    allowed = video.IMAGE_CODECS if is_image else video.OUTPUT_FORMATS
    if output.suffix.lower() not in allowed:
        kind = "an image input gives an image" if is_image else "a video output"
        raise ScoreCamError(f"output {output}: {kind}; use one of {', '.join(allowed)}")


def _resolve_target(
    config: Config, info: video.VideoInfo, explainer: Explainer
) -> tuple[str, tuple[int, ...] | None]:
    """Return (description, fixed classes or None for each frame's top-k)."""
    wanted = config.explain.target
    names = explainer.meta.class_names
    if wanted == "top1":
        return "top1", None
    if wanted == "dominant":
        counts = _classify_all(config, info, explainer)
        best = int(np.argmax(counts))
        log.info(
            "dominant class %d (%s): top-1 in %d frames", best, _name(names, best), counts[best]
        )
        return f"dominant: {_name(names, best)}", (best,)
    if wanted.lstrip("-").isdigit():
        index = int(wanted)
        classes = len(names) if names else None
        if index < 0 or (classes is not None and index >= classes):
            raise ScoreCamError(
                f"--target {index} is not a class id of the model (0..{(classes or 1) - 1})"
            )
        return _name(names, index), (index,)
    lowered = [n.lower() for n in names]
    if wanted.lower() in lowered:
        index = lowered.index(wanted.lower())
        return names[index], (index,)
    close = [n for n in names if wanted.lower() in n.lower()][:4]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ScoreCamError(
        f"--target '{wanted}' is not top1, dominant, a class id or a class name{hint}"
    )


def _classify_all(config: Config, info: video.VideoInfo, explainer: Explainer) -> np.ndarray:
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

    for frame in _window_frames(config):
        batch.append(_model_input(frame.image, meta))
        if len(batch) == 32:
            flush()
    if batch:
        flush()
    if counts is None:
        raise ScoreCamError(f"no frames to classify in {config.input}")
    return counts


def _window_frames(config: Config) -> Iterator[video.Frame]:
    w = config.window
    return video.read_frames(config.input, start=w.start, end=w.end, max_frames=w.max_frames)


def _model_input(image: np.ndarray, meta: ModelMeta) -> torch.Tensor:
    # uint8 (S, S, 3): a quarter of the bytes of the float input; the worker normalises it.
    return torch.from_numpy(resize_frame(image, meta.input_size))


def _name(names: tuple[str, ...], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)


def _process(
    config: Config,
    info: video.VideoInfo,
    explainer: Explainer,
    fixed: tuple[int, ...] | None,
    paths: dict[str, Path],
    progress: Progress | None,
) -> tuple[int, int]:
    """Run decode -> explain -> render -> encode; return (frames written, frames explained)."""
    meta = explainer.meta
    every = config.explain.every
    total = _expected_frames(config, info)
    options = RenderOptions(
        layout=config.output.layout, colormap=config.output.colormap, alpha=config.output.alpha
    )
    scaler = MapScaler(config.output.scale)
    maps_out = MapsWriter(paths["maps"]) if "maps" in paths else None
    records = RecordsWriter(paths["jsonl"]) if "jsonl" in paths else None
    preview = PreviewSampler() if "preview" in paths else None

    decoded = _Producer(_window_frames(config))

    def tasks() -> Iterator[tuple[video.Frame, FrameTask | None]]:
        for frame in decoded:
            explain = frame.index % every == 0
            x = _model_input(frame.image, meta) if explain else None
            yield frame, (FrameTask(frame.index, x, fixed) if explain else None)

    encoder = _Encoder(info, config, paths.get("video"), options, preview)
    smoothed: np.ndarray | None = None
    latest: FrameResult | None = None
    heat: np.ndarray | None = None
    done = explained = 0
    try:
        for frame, result in explainer.explain(tasks()):
            if result is not None:
                latest, explained = result, explained + 1
                first = result.maps[0]
                a = config.explain.smooth
                smoothed = first if smoothed is None or a == 0 else a * smoothed + (1 - a) * first
                heat = scaler(smoothed)
                if maps_out is not None:
                    maps = result.maps if config.explain.topk > 1 else result.maps[0]
                    targets = result.targets if config.explain.topk > 1 else result.targets[0]
                    maps_out.add(maps, targets, frame.seconds)
            assert latest is not None and heat is not None  # frame 0 is always explained
            label = _label(meta, latest, frame, reused=result is None)
            if records is not None:
                records.add(_record(meta, latest, frame, reused=result is None))
            encoder.put(frame, heat, label)
            done += 1
            if progress is not None:
                progress(done, total)
        encoder.finish()
        if maps_out is not None:
            maps_out.close()
        if preview is not None:
            preview.write(paths["preview"])
    except BaseException:
        encoder.abort()
        if maps_out is not None:
            maps_out.abort()
        raise
    finally:
        decoded.stop()
        if records is not None:
            records.close()
    if done == 0:
        raise ScoreCamError(f"no frames decoded from {config.input} in the time window")
    return done, explained


def _expected_frames(config: Config, info: video.VideoInfo) -> int | None:
    """Return the number of frames the window should hold, when it can be known."""
    w = config.window
    count = info.frame_count
    if count is None and info.duration:
        count = round(info.duration * info.fps)
    if count is not None and (w.start or w.end):
        span = (w.end if w.end is not None else (info.duration or 0)) - (w.start or 0)
        count = max(0, round(span * info.fps))
    if w.max_frames is not None:
        count = min(count, w.max_frames) if count is not None else w.max_frames
    return count


def _label(meta: ModelMeta, result: FrameResult, frame: video.Frame, reused: bool) -> str:
    name = _name(meta.class_names, int(result.targets[0]))
    minutes, seconds = divmod(max(frame.seconds, 0.0), 60)
    text = f"{name} {result.probs[0]:.2f}  {int(minutes):02d}:{seconds:05.2f}"
    return f"{text}  (map of frame {result.index})" if reused else text


def _record(
    meta: ModelMeta, result: FrameResult, frame: video.Frame, reused: bool
) -> dict[str, Any]:
    return {
        "index": frame.index,
        "pts_seconds": round(frame.seconds, 6),
        "target": int(result.targets[0]),
        "name": _name(meta.class_names, int(result.targets[0])),
        "probability": round(float(result.probs[0]), 6),
        "targets": [int(t) for t in result.targets],
        "probabilities": [round(float(p), 6) for p in result.probs],
        "skipped": result.skipped,
        "milliseconds": 0.0 if reused else round(result.seconds * 1000, 3),
        "map_of_frame": result.index,
    }


class _Producer:
    """Runs an iterator in a thread, handing items over a bounded queue (errors re-raised)."""

    _END = object()

    def __init__(self, source: Iterable[Any], size: int = QUEUE_FRAMES) -> None:
        self._queue: queue.Queue = queue.Queue(size)
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(source,), daemon=True, name="decode"
        )
        self._thread.start()

    def _run(self, source: Iterable[Any]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)

    def _put(self, item: Any) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        """Ask the thread to stop and wait for it briefly."""
        self._stopped.set()
        self._thread.join(timeout=5)


class _Encoder:
    """Renders and encodes frames in a thread, in the order they are put."""

    def __init__(
        self,
        info: video.VideoInfo,
        config: Config,
        path: Path | None,
        options: RenderOptions,
        preview: PreviewSampler | None,
    ) -> None:
        self._info, self._config, self._path = info, config, path
        self._options, self._preview = options, preview
        self._queue: queue.Queue = queue.Queue(QUEUE_FRAMES)
        self._error: BaseException | None = None
        self._writer: video.VideoWriter | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="encode")
        self._thread.start()

    def put(self, frame: video.Frame, heat: np.ndarray, label: str) -> None:
        """Queue one frame; raises the encoder's error if it failed."""
        while True:
            self._raise_error()
            try:
                self._queue.put((frame, heat, label), timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Encode what is queued, flush and close the output."""
        self._queue.put(None)
        self._thread.join()
        self._raise_error()

    def abort(self) -> None:
        """Stop without flushing (the caller discards the output)."""
        self._error = self._error or ScoreCamError("aborted")
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout=10)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                if self._error is not None:
                    continue  # aborted: drain
                frame, heat, label = item
                image = render_frame(frame.image, heat, label, self._options)
                if self._preview is not None:
                    self._preview.offer(image)
                self._write(frame, image)
            if self._error is None:
                self._close()
        except BaseException as err:
            self._error = err
            if self._writer is not None:
                with contextlib.suppress(Exception):
                    self._writer._abort()

    def _write(self, frame: video.Frame, image: np.ndarray) -> None:
        if self._path is None:
            return
        if self._info.is_image:
            video.write_image(str(self._path), image)
            return
        if self._writer is None:
            self._writer = self._open_writer(image)
        self._writer.write(image, frame.pts, frame.time_base)

    def _open_writer(self, image: np.ndarray) -> video.VideoWriter:
        info, w = self._info, self._config.window
        audio_end = w.end
        if w.max_frames is not None:
            # Audio stops with the last frame: the window's start plus max_frames at the rate.
            cap = (w.start or info.start_time) + w.max_frames / info.fps
            audio_end = cap if audio_end is None else min(audio_end, cap)
        return video.VideoWriter(
            str(self._path),
            image.shape[1],
            image.shape[0],
            info.time_base,
            info.fps,
            crf=self._config.output.crf,
            audio_from=self._config.input if info.has_audio else None,
            audio_start=w.start,
            audio_end=audio_end,
            time_offset=w.start or 0.0,
        )

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
