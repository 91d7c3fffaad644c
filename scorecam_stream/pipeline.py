"""Runs one input: opens it, claims the outputs, and hands over to the file or the live loop.

The input is opened once (one :class:`~scorecam_stream.video.VideoReader` session). A file is
read frame by frame as fast as the explainer goes (:mod:`scorecam_stream.file_run`); a live
source is read at its own pace and the explainer takes the newest frame whenever it is free
(:mod:`scorecam_stream.live`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from . import video
from .config import Config
from .config_video import RECONNECT_MAX_DELAY_S
from .errors import ScoreCamError
from .file_run import run_file
from .live import run_live
from .monitoring import RunMetrics, serve_metrics, stream_label
from .outputs import MapsWriter, Outputs, PreviewSampler, RecordsWriter
from .records import Progress, RunSummary
from .workers import Explainer, LocalExplainer, OwnedExplainer, Worker

log = logging.getLogger(__name__)


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


def make_explainer(config: Config, live: bool = False) -> OwnedExplainer:
    """Return the in-process explainer, or the Ray one when workers/GPUs/address are given.

    Live, the Ray explainer keeps one frame in flight (its map ready soonest), and the
    in-process one leaves a core to decoding and encoding (:func:`live_torch_threads`).
    """
    topk = config.explain.topk
    evaluation = config.evaluation  # --metrics: the workers score their maps too
    if config.distributed.uses_ray:
        from .distributed import RayExplainer  # only imported (with ray) when asked for

        return RayExplainer(
            config.model, config.engine, config.distributed, topk, evaluation=evaluation, live=live
        )
    threads = live_torch_threads() if live else None
    worker = Worker(config.model, config.engine, threads=threads, evaluation=evaluation)
    return LocalExplainer(worker, topk)


def live_torch_threads(cpus: int | None = None) -> int:
    """Return the torch threads of an in-process live run: every core but one.

    The reader decodes and the encoder encodes every frame of the source at its pace; with
    torch on every core they fall behind and frames are dropped. One core is left to them.
    """
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    return max(1, cpus - 1)


def _read_timeout(config: Config, live: bool) -> float | None:
    given = config.source.read_timeout
    return given if given is not None or not live else video.LIVE_READ_TIMEOUT_S


def is_live_run(config: Config) -> bool:
    """Return whether ``config.input`` is read live (``--live``/``--no-live``, else guessed)."""
    source = config.source
    if source.live is not None:
        return source.live
    return video.is_live_source(config.input, source.input_format)


def run(
    config: Config,
    progress: Progress | None = None,
    explainer: Explainer | None = None,
    monitor: RunMetrics | None = None,
    stop: threading.Event | None = None,
) -> RunSummary:
    """Explain the frames of ``config.input`` and write the annotated output; return a summary.

    ``explainer``: one lent by the caller (a batch's, a benchmark's), left open; by default the
    run makes its own (:func:`make_explainer`) and closes it. ``monitor``: this stream's
    Prometheus metrics, served by the caller (else ``--prometheus-port`` serves the run's own).
    ``stop``: set by the caller to stop a live run as Ctrl-C does (from any thread; a run in a
    thread gets no KeyboardInterrupt). Every file output is written to a
    temporary file beside it and moved into place only when the whole run succeeded: a failed
    or interrupted run leaves nothing half-written. A live run stopped by Ctrl-C, SIGTERM or
    ``--duration`` finishes its outputs and succeeds; its records (``--jsonl``) are written in
    place as they are made, so they can be followed.
    """
    began = time.perf_counter()
    live = is_live_run(config)
    # Before the input opens, the model loads or Ray starts: a bad output path fails at once.
    # A live run makes its outputs' missing directories (-o live/cam.m3u8).
    video.check_output_dirs(config.output.paths, create=live)
    video.check_encoder(config.output.encoder)
    with contextlib.ExitStack() as stack:
        # Listening first too: a port in use fails at once, and the run is watched from start.
        metrics = monitor if monitor is not None else _serve_metrics(config, live, stack)
        reader = _open_input(config, live, stop)
        stack.callback(reader.close)
        outputs = _claim_outputs(config, reader.info, live, stack)
        if outputs.records is not None:
            stack.callback(outputs.records.close)

        def open_explainer() -> Explainer:
            if explainer is not None:
                return explainer  # lent: its owner closes it
            made = make_explainer(config, live)
            stack.callback(made.close)
            return made

        if live:
            summary = run_live(
                config, reader, open_explainer, outputs, progress, stack, metrics, stop
            )
        else:
            summary = run_file(config, reader, open_explainer(), outputs, progress)
    output = outputs.video_name if live else Path(outputs.video_name)
    return dataclasses.replace(summary, output=output, seconds=time.perf_counter() - began)


def _open_input(config: Config, live: bool, stop: threading.Event | None) -> video.VideoReader:
    """Return the input opened; a live network input that is not up yet is waited for."""
    source = config.source

    def open_reader() -> video.VideoReader:
        return video.VideoReader(
            config.input, source.input_format, source.options, _read_timeout(config, live)
        )

    if not (live and video.is_network_input(config.input)):
        return open_reader()
    attempts = video.reconnect_attempts(config.input, source.reconnect)
    delay = source.reconnect_delay
    return video.open_when_up(open_reader, attempts, delay, RECONNECT_MAX_DELAY_S, stop)


def _claim_outputs(
    config: Config, info: video.VideoInfo, live: bool, stack: contextlib.ExitStack
) -> Outputs:
    """Return the run's outputs, each claimed on ``stack`` (kept only if the run succeeds).

    Claimed before any work: an existing file without --overwrite fails at once.
    """
    out = config.output
    target = out.output or str(default_output(config.input, info.is_image))
    kind = _output_kind(target, info.is_image)
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
    return Outputs(
        video=claimed.get("video", None if kind == "file" else target),
        video_name=target,
        image=info.is_image,
        maps=MapsWriter(claimed["maps"], Path(out.save_maps).parent) if out.save_maps else None,
        records=RecordsWriter(claimed["jsonl"]) if "jsonl" in claimed else None,
        preview=PreviewSampler() if "preview" in claimed else None,
        preview_path=claimed.get("preview"),
        preview_name=out.preview,
    )


def _serve_metrics(config: Config, live: bool, stack: contextlib.ExitStack) -> RunMetrics | None:
    """Return the run's Prometheus metrics, served until ``stack`` closes (live runs only)."""
    monitoring = config.monitoring
    if monitoring.prometheus_port is None:
        return None
    if not live:
        log.warning("--prometheus-port: metrics are served for live runs only; none for this one")
        return None
    stream = stream_label(config.input)
    board, server = serve_metrics(monitoring, [stream])
    stack.callback(server.close)
    return board[stream]


def _output_kind(target: str, is_image: bool) -> str:
    if is_image:
        if Path(target).suffix.lower() not in video.IMAGE_CODECS:
            allowed = ", ".join(video.IMAGE_CODECS)
            raise ScoreCamError(f"output {target}: an image input gives an image; use {allowed}")
        return "file"
    return video.output_kind(target)
