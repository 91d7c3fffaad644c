"""The ``scorecam-video`` command: argv and config files -> Config -> pipeline; exit codes.

One input runs :func:`~scorecam_stream.pipeline.run`; several inputs (or a directory, a glob,
``--inputs LIST``, ``-o DIR/``, ``--summary``) run :func:`~scorecam_stream.batch.run_batch`.

Exit codes: 0 success (every input done or skipped), 2 a user mistake or a fault that stopped
the run (one line on stderr), 3 some inputs of several failed (the others were done; a table
of the failed ones on stderr), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Only this
module reads argv, the environment and config files.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from . import __version__
from .config import FIELDS, BatchConfig, Config, build_config
from .errors import ScoreCamError, Terminated, first_line

if TYPE_CHECKING:
    from tqdm import tqdm

    from .batch import BatchProgress, VideoRecord

PROG = "scorecam-video"
log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line ScoreCamErrors (exit 2, no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise ScoreCamError(message)


def _bool_flag(parser: argparse._ActionsContainer, name: str, help_text: str) -> None:
    parser.add_argument(
        f"--{name}",
        dest=name.replace("-", "_"),
        action=argparse.BooleanOptionalAction,
        help=help_text,
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser; options not given stay absent (config files fill them)."""
    p = _Parser(
        prog=PROG,
        argument_default=argparse.SUPPRESS,
        description="Score-CAM heatmaps over every frame of a video (or an image).",
    )
    p.add_argument(
        "input",
        nargs="*",
        help="video file, stream URL (udp/srt/rtsp/rtmp/http...), - for stdin, or image; "
        "several files, directories (their videos) or glob patterns for a batch",
    )
    p.add_argument(
        "-o",
        "--output",
        help="output file, DIR/name.m3u8 (HLS), udp://, srt://, tcp://, rtmp:// or - "
        "(default: <input>.scorecam.mp4 beside it); with several inputs a directory (DIR/)",
    )
    p.add_argument("--config", help="YAML file of settings (keys are the flags, e.g. batch_size)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    g = p.add_argument_group("many inputs (a batch)")
    g.add_argument(
        "--inputs", metavar="LIST", help="a file of inputs, one a line (# comments, blank lines)"
    )
    g.add_argument(
        "--summary", metavar="FILE.jsonl", help="one JSON record per video (status, frames...)"
    )
    g.add_argument(
        "--max-inflight-videos",
        type=int,
        metavar="N",
        help="videos in progress at once (default 2 with --gpus/--workers, else 1)",
    )
    _bool_flag(
        g,
        "video-tasks",
        "run each video's decode/encode as a Ray task on any node (with --gpus/--workers/"
        "--address; its input and outputs must be reachable from every node)",
    )
    g = p.add_argument_group("input and live mode")
    _bool_flag(
        g,
        "live",
        "read at the source's pace and explain the newest frame when free "
        "(default: on for network, pipe and device inputs)",
    )
    g.add_argument("--input-format", help="FFmpeg input format, e.g. v4l2 for /dev/video0")
    g.add_argument(
        "--input-option",
        action="append",
        metavar="KEY=VALUE",
        help="FFmpeg demuxer/protocol option, repeatable (e.g. rtsp_transport=tcp)",
    )
    g.add_argument(
        "--read-timeout",
        type=float,
        help="seconds without data after which the input has ended (default 10 for live)",
    )
    g.add_argument(
        "--reconnect",
        type=int,
        metavar="N",
        help="reopen a live network input that breaks off or ends, up to N attempts per outage "
        "(default 10 for network inputs; 0: off)",
    )
    g.add_argument(
        "--reconnect-delay",
        type=float,
        metavar="SECONDS",
        help="wait before the first attempt, doubled for each next one up to 30 s (default 1)",
    )
    g.add_argument("--duration", type=float, help="stop after this many seconds of source")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", help="vgg16 (default), efficientnet_lite0, torchvision:NAME, timm:NAME"
    )
    g.add_argument("--weights", help="local state dict instead of downloaded weights")
    g.add_argument("--layer", help="target layer, dotted path (default: per model / auto)")
    g.add_argument("--input-size", type=int, help="model input side S (frames resized to SxS)")
    g.add_argument("--device", help="cpu, cuda or cuda:N")
    g.add_argument("--mean", type=rgb_triple, help="R,G,B input mean (default: the model's own)")
    g.add_argument("--std", type=rgb_triple, help="R,G,B input std (default: the model's own)")
    g.add_argument(
        "--fit", help="non-square frames: squash (default), pad or crop to the square input"
    )
    g = p.add_argument_group("Score-CAM")
    g.add_argument("--batch-size", type=int, help="masked inputs per forward (default 32)")
    g.add_argument(
        "--dtype",
        help="masked passes in fp32 (default, exact), fp16 (the GPU preset: Lite0 maps measured "
        "within r 0.999 and 2 %% of fp32's at 128 px, up to 3.7 %% off at 96 px) or bf16 (not "
        "exact: maps 5-39 %% of their norm away from fp32's); see docs/precision.md",
    )
    g.add_argument(
        "--variant", help="article (default) or pytorch-grad-cam (that library's ScoreCAM)"
    )
    g.add_argument("--score", help="softmax (default), logit or logit_delta")
    _bool_flag(g, "channel-softmax", "softmax of the scores across channels")
    g.add_argument("--combine", help="normalized (default) or raw")
    _bool_flag(g, "skip-constant", "skip constant channels' passes (exact; default on)")
    g.add_argument("--max-channels", type=int, help="Faster Score-CAM: top-N variance channels")
    _bool_flag(g, "channels-last", "channels-last memory format (default on)")
    _bool_flag(g, "compile", "torch.compile the masked passes (fixed-shape chunks; CUDA graphs)")
    g = p.add_argument_group("targets and time")
    g.add_argument("--target", help="top1 (default), dominant, a class id or a class name")
    g.add_argument("--topk", type=int, help="K maps per frame (top-K classes; first rendered)")
    g.add_argument("--every", type=int, help="explain every Nth frame, reuse the map between")
    g.add_argument("--smooth", type=float, help="moving average of maps, weight of the past")
    g.add_argument(
        "--fidelity",
        type=float,
        help="reuse masked passes across frames, keeping this correlation with the exact maps "
        "(measured at keyframes); 1 = exact (default for files; 0.99 for live inputs)",
    )
    g.add_argument("--start", type=float, help="first second to process")
    g.add_argument("--end", type=float, help="second to stop at")
    g.add_argument("--max-frames", type=int, help="process at most N frames")
    g = p.add_argument_group("rendering and outputs")
    g.add_argument("--layout", help="overlay (default) or side-by-side")
    g.add_argument("--colormap", help="OpenCV colormap name (default jet)")
    g.add_argument("--alpha", type=float, help="heatmap weight in the blend, [0, 1]")
    g.add_argument("--scale", help="display scale: running (default, no flicker) or frame")
    g.add_argument("--crf", type=int, help="H.264 quality, 0-51 (default 20)")
    g.add_argument("--save-maps", help="write the maps, targets and times to FILE.npz")
    g.add_argument("--jsonl", help="write one JSON record per frame to FILE")
    g.add_argument("--preview", help="write a contact sheet of ~8 frames to FILE.png")
    g.add_argument("--hls-time", type=float, help="HLS output: segment seconds (default 2)")
    g.add_argument(
        "--output-size",
        type=size_pair,
        metavar="WxH",
        help="scale the output video's frames to W x H as --fit says (default: the input's)",
    )
    g.add_argument(
        "--hls-list-size", type=int, help="HLS output: segments in the playlist (default 6)"
    )
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--quiet", action="store_true", help="no progress bar, errors only")
    g = p.add_argument_group("faithfulness metrics")
    g.add_argument(
        "--metrics",
        action="store_true",
        help="score each map: Average Drop/Increase, insertion/deletion; table at the end",
    )
    g.add_argument("--baseline", help="gradcam: also its maps and metrics, side by side")
    g.add_argument("--metric-steps", type=int, help="insertion/deletion steps (default 28)")
    g = p.add_argument_group("monitoring")
    g.add_argument(
        "--prometheus-port",
        type=int,
        metavar="PORT",
        help="live runs: serve Prometheus metrics at http://ADDR:PORT/metrics while running",
    )
    g.add_argument(
        "--prometheus-addr",
        metavar="ADDR",
        help="the address the metrics are served on (default 0.0.0.0: every interface)",
    )
    g = p.add_argument_group("distributed (Ray)")
    g.add_argument("--gpus", type=int, help="N Ray workers, one GPU each")
    g.add_argument(
        "--workers-per-gpu", type=int, help="K workers share each GPU (1/K each; default 1)"
    )
    g.add_argument("--workers", type=int, help="N Ray workers on CPU")
    g.add_argument(
        "--address",
        help="join a Ray cluster: auto, HOST:PORT or ray://... "
        "(default: $RAY_ADDRESS with --gpus/--workers, else a local instance)",
    )
    g.add_argument("--max-inflight-frames", type=int, help="frames in flight at once")
    g.add_argument("--shards-per-frame", type=int, help="channel shards per frame")
    g.add_argument("--startup-timeout", type=float, help="seconds to wait for workers")
    g.add_argument(
        "--max-shard-retries", type=int, help="retries of a failing shard before giving up"
    )
    g.add_argument(
        "--threads-per-worker", type=int, help="torch threads of each CPU worker (default: CPUs/N)"
    )
    return p


def rgb_triple(text: str) -> tuple[float, float, float]:
    """Return the three floats of ``R,G,B`` (argparse turns a ValueError into a usage error)."""
    parts = [p for p in str(text).replace(" ", ",").split(",") if p]
    if len(parts) != 3:
        raise ValueError(f"expected R,G,B, got {text!r}")
    r, g, b = (float(p) for p in parts)
    return r, g, b


def size_pair(text: str) -> tuple[int, int]:
    """Return (width, height) of ``WxH`` (argparse turns a ValueError into a usage error)."""
    parts = str(text).lower().split("x")
    if len(parts) != 2:
        raise ValueError(f"expected WIDTHxHEIGHT, got {text!r}")
    width, height = (int(p) for p in parts)
    return width, height


def load_settings(path: str) -> dict[str, Any]:
    """Return the flat settings of a YAML config file (dashes in keys read as underscores)."""
    file = Path(path)
    if not file.is_file():
        raise ScoreCamError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ScoreCamError(f"config file {path} is not valid YAML: {first_line(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ScoreCamError(f"config file {path} must be a mapping of settings")
    settings = {str(k).replace("-", "_"): v for k, v in data.items()}
    for key in ("mean", "std"):  # "0.5,0.5,0.5" or [0.5, 0.5, 0.5]
        value = settings.get(key)
        if isinstance(value, str | list):
            try:
                settings[key] = rgb_triple(
                    ",".join(map(str, value)) if isinstance(value, list) else value
                )
            except ValueError:
                raise ScoreCamError(
                    f"config file {path}: {key} must be three numbers R,G,B, got {value!r}"
                ) from None
    size = settings.get("output_size")
    if isinstance(size, str | list):  # "1280x720" or [1280, 720]
        try:
            settings["output_size"] = size_pair(
                "x".join(map(str, size)) if isinstance(size, list) else size
            )
        except ValueError:
            raise ScoreCamError(
                f"config file {path}: output_size must be WIDTHxHEIGHT, "
                f"got {settings['output_size']!r}"
            ) from None
    unknown = sorted(set(settings) - set(FIELDS) - {"quiet"} - set(_BATCH_FILE_SETTINGS))
    if unknown:
        raise ScoreCamError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return settings


_BATCH_SETTINGS = ("summary", "max_inflight_videos", "video_tasks")
_BATCH_FILE_SETTINGS = ("max_inflight_videos", "video_tasks")  # what a config file may hold
_SIDE_OUTPUTS = {"save_maps": "--save-maps", "jsonl": "--jsonl", "preview": "--preview"}


def read_input_list(path: str) -> list[str]:
    """Return the inputs of a ``--inputs`` file: one a line, blank lines and ``#`` lines skipped.

    Relative paths are taken from the current directory, as on the command line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ScoreCamError(f"cannot read --inputs {path}: {first_line(err)}") from None
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _is_directory(path: str) -> bool:
    """Return whether ``path`` names a directory: ending with a slash, or an existing one."""
    return path.endswith(("/", os.sep)) or Path(path).is_dir()


def _is_batch(items: list[str], settings: dict[str, Any], listed: bool) -> bool:
    """Return whether a command line is a batch: several inputs, a directory, a glob, a list,
    ``-o DIR/`` or ``--summary``. One file (or one stream) otherwise, exactly as before."""
    from .video import is_glob  # not from .batch: that loads torch, and this is argv parsing

    if listed or len(items) != 1 or "summary" in settings:
        return True
    item = items[0]
    if item == "-" or "://" in item:
        return False
    path = Path(item)
    if path.is_dir() or (is_glob(item) and not path.exists()):
        return True
    output = settings.get("output")
    return output is not None and _is_directory(str(output))


def parse_command(argv: list[str] | None) -> tuple[Config, BatchConfig | None]:
    """Return the Config of a command line (defaults < --config file < flags) and, for a
    batch, its BatchConfig (the Config then holds the settings shared by every video)."""
    args = vars(build_parser().parse_intermixed_args(argv))
    settings = load_settings(args.pop("config")) if "config" in args else {}
    settings.update(args)
    items = list(settings.pop("input", None) or [])
    listed = "inputs" in settings
    if listed:
        items += read_input_list(settings.pop("inputs"))
    if not items:
        raise ScoreCamError(
            "no input given" + (f" (the list {args['inputs']} is empty)" if listed else "")
        )
    batch_settings = {key: settings.pop(key) for key in _BATCH_SETTINGS if key in settings}
    if not _is_batch(items, settings | batch_settings, listed):
        for key in ("max_inflight_videos", "video_tasks"):
            if key in args:  # a config file's value serves its batch runs only
                raise ScoreCamError(f"--{key.replace('_', '-')} is for several inputs")
        return _config(items[0], settings), None
    output = settings.pop("output", None)
    if output is not None and not _is_directory(str(output)):
        raise ScoreCamError(
            f"-o {output}: with several inputs, -o names a directory (end it with /)"
        )
    side = {}
    for key, flag in _SIDE_OUTPUTS.items():
        value = settings.pop(key, None)
        if value is not None and not _is_directory(str(value)):
            raise ScoreCamError(
                f"{flag} {value}: with several inputs, {flag} names a directory (end it with /)"
            )
        side[key] = value
    batch = BatchConfig(
        inputs=tuple(items),
        output_dir=output,
        maps_dir=side["save_maps"],
        jsonl_dir=side["jsonl"],
        preview_dir=side["preview"],
        summary=batch_settings.get("summary"),
        max_inflight_videos=batch_settings.get("max_inflight_videos"),
        video_tasks=bool(batch_settings.get("video_tasks", False)),
    )
    config = _config(items[0], settings)
    if batch.video_tasks and not config.distributed.uses_ray:
        raise ScoreCamError(
            "--video-tasks runs videos as Ray tasks: add --workers, --gpus or --address"
        )
    return config, batch


def parse_config(argv: list[str] | None) -> Config:
    """Return the Config of a one-input command line: defaults < --config file < flags."""
    config, batch = parse_command(argv)
    if batch is not None:
        raise ScoreCamError("several inputs: use parse_command")
    return config


def _config(input_path: str, settings: dict[str, Any]) -> Config:
    """Return the validated Config of flat settings (``settings`` is consumed)."""
    if "input_option" in settings:
        settings["input_option"] = tuple(settings["input_option"] or ())
    quiet = bool(settings.pop("quiet", False))
    distributing = settings.get("gpus") or settings.get("workers")
    if distributing and not settings.get("address") and os.environ.get("RAY_ADDRESS"):
        settings["address"] = os.environ["RAY_ADDRESS"]
    return build_config(input_path, settings, quiet=quiet)


def _check_outputs_first(config: Config) -> None:
    """Check the outputs' directories (a live run makes missing ones) before torch loads, so a
    bad path is a one-line error at once; the run checks them again (it may be called alone)."""
    from . import video

    source = config.source
    live = source.live
    if live is None:
        live = video.is_live_source(config.input, source.input_format)
    video.check_output_dirs(config.output.paths, create=live)


class _ProgressBar:
    """A tqdm bar on stderr, created at the first frame."""

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


def _log_to_stderr(quiet: bool) -> logging.Handler:
    """Send the package's warnings (only errors when quiet) to stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    logger = logging.getLogger("scorecam_stream")
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    logger.addHandler(handler)
    return handler


class _OnSigterm:
    """A SIGTERM handler that raises Terminated, and remembers that it did.

    Remembered because a KeyboardInterrupt subclass raised inside a Ray call comes out of it as a
    plain KeyboardInterrupt.
    """

    def __init__(self) -> None:
        self.received = False

    def __call__(self, _signum: int, _frame: object) -> None:
        self.received = True
        raise Terminated


def _clock(seconds: float | None) -> str:
    """Return ``H:MM:SS`` (``?`` when unknown)."""
    if seconds is None:
        return "?"
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class _BatchDisplay:
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


def _failure_table(failed: list[VideoRecord]) -> str:
    """Return the table of failed inputs and why, one row each."""
    width = max(len("input"), *(len(r.input) for r in failed))
    rows = [f"  {'input':<{width}}  reason"] + [f"  {r.input:<{width}}  {r.error}" for r in failed]
    return f"{PROG}: {len(failed)} input(s) failed:\n" + "\n".join(rows)


def run_many(config: Config, batch: BatchConfig) -> int:
    """Run a batch with its progress on stderr; return 0, or 3 if some inputs failed."""
    from .batch import run_batch  # torch, av and friends load only for a real run

    display = _BatchDisplay(config.quiet, sys.stderr.isatty())
    try:
        result = run_batch(config, batch, on_progress=display.progress, on_record=display.record)
    finally:
        display.close()
    done, failed = result.with_status("done"), result.with_status("failed")
    skipped = result.with_status("skipped")
    if not config.quiet:
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
        print(line, file=sys.stderr)
    if failed:
        print(_failure_table(failed), file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit code."""
    bar: _ProgressBar | None = None
    handler: logging.Handler | None = None
    batch: BatchConfig | None = None
    on_main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM (kill, `ray job stop`) unwinds like Ctrl-C: workers stopped, nothing half-written.
    sigterm = _OnSigterm()
    previous = signal.signal(signal.SIGTERM, sigterm) if on_main_thread else None
    try:
        config, batch = parse_command(argv)
        handler = _log_to_stderr(config.quiet)
        if batch is not None:
            return run_many(config, batch)
        _check_outputs_first(config)
        from .pipeline import run  # torch, av and friends load only for a real run

        if not config.quiet and sys.stderr.isatty():
            bar = _ProgressBar()
        summary = run(config, progress=bar)
        if bar is not None:
            bar.close()
        if not config.quiet:
            rate = summary.frames / summary.seconds if summary.seconds else 0.0
            line = (
                f"{PROG}: wrote {summary.output} ({summary.frames} frames, "
                f"{summary.explained} explained, target {summary.target}) in "
                f"{summary.seconds:.1f} s, {rate:.2f} frames/s"
            )
            if summary.live and summary.latency_p50_ms is not None:
                line += (
                    f"; live, latency p50 {summary.latency_p50_ms:.0f} ms, "
                    f"p95 {summary.latency_p95_ms:.0f} ms"
                )
            if summary.stopped_by:
                line += f"; stopped by {summary.stopped_by}"
            print(line, file=sys.stderr)
        if summary.metrics_table:
            # Asked-for results: stdout, even with --quiet (stderr when stdout carries the video).
            table_out = sys.stderr if config.output.output == "-" else sys.stdout
            print(summary.metrics_table, file=table_out)
        return 0
    except ScoreCamError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # A batch keeps its finished videos; the ones in progress are not written.
        what = "the videos in progress not written" if batch is not None else "no output written"
        if sigterm.received:
            print(f"{PROG}: terminated; {what}", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"{PROG}: interrupted; {what}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if bar is not None:
            bar.close()
        if handler is not None:
            logging.getLogger("scorecam_stream").removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
