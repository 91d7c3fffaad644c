"""The ``scorecam-video`` command: argv and config files -> Config -> pipeline; exit codes.

One input runs :func:`~scorecam_stream.pipeline.run`; several inputs (or a directory, a glob,
``--inputs LIST``, ``-o DIR/``, ``--summary``) run :func:`~scorecam_stream.batch.run_batch`.
The options are declared in :mod:`~scorecam_stream.cli_parser`; what is shown on stderr while
and after a run in :mod:`~scorecam_stream.cli_progress`.

Exit codes: 0 success (every input done or skipped), 2 a user mistake or a fault that stopped
the run (one line on stderr), 3 some inputs of several failed (the others were done; a table
of the failed ones on stderr), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Only this
module (with the two above) reads argv, the environment and config files.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from .cli_parser import PROG, build_parser, rgb_triple, size_pair
from .cli_progress import BatchDisplay, ProgressBar, batch_line, failure_table, run_line
from .config import FIELDS, Config, build_config
from .config_batch import BatchConfig
from .errors import ScoreCamError, Terminated, first_line

log = logging.getLogger(__name__)


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


_BATCH_SETTINGS = ("summary", "max_inflight_videos", "video_tasks", "name")
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
        for key in ("max_inflight_videos", "video_tasks", "name"):
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
        names=tuple(batch_settings.get("name") or ()),
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
    video.check_encoder(config.output.encoder)


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


def run_many(config: Config, batch: BatchConfig) -> int:
    """Run a batch with its progress on stderr; return 0, or 3 if some inputs failed."""
    from .batch import run_batch  # torch, av and friends load only for a real run

    display = BatchDisplay(config.quiet, sys.stderr.isatty())
    try:
        result = run_batch(config, batch, on_progress=display.progress, on_record=display.record)
    finally:
        display.close()
    if not config.quiet:
        print(batch_line(result, batch), file=sys.stderr)
    failed = result.with_status("failed")
    if failed:
        print(failure_table(failed), file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit code."""
    bar: ProgressBar | None = None
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
            bar = ProgressBar()
        summary = run(config, progress=bar)
        if bar is not None:
            bar.close()
        if not config.quiet:
            print(run_line(summary), file=sys.stderr)
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
