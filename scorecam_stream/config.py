"""Configuration: frozen dataclasses, validated on construction, passed down explicitly.

Only :mod:`scorecam_stream.cli` reads argv and YAML files; it builds a :class:`Config` with
:func:`build_config` from flat ``key: value`` settings whose keys are the command-line flags
with underscores (``batch_size: 32``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ScoreCamError
from .render import COLORMAPS, LAYOUTS

# --fidelity of live runs when not given: a map sooner matters more there (docs/benchmarks.md).
LIVE_FIDELITY = 0.99


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ScoreCamError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Which model, layer and weights; where it runs."""

    spec: str = "vgg16"
    layer: str | None = None
    weights: str | None = None
    input_size: int | None = None
    device: str = "cpu"
    mean: tuple[float, float, float] | None = None  # None: the model's own
    std: tuple[float, float, float] | None = None  # None: the model's own
    fit: str = "squash"  # how a non-square frame becomes the square model input

    def __post_init__(self) -> None:
        for name, value in (("--mean", self.mean), ("--std", self.std)):
            _check(
                value is None
                or (
                    isinstance(value, tuple)
                    and len(value) == 3
                    and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
                ),
                f"{name} must be three numbers R,G,B (e.g. 0.5,0.5,0.5), got {value!r}",
            )
        _check(
            self.std is None or min(self.std) > 0, f"--std must be > 0 in every channel: {self.std}"
        )
        _check(
            self.fit in ("squash", "pad", "crop"),
            f"--fit must be squash, pad or crop, got '{self.fit}'",
        )
        _check(
            self.input_size is None or self.input_size >= 16,
            f"--input-size must be at least 16, got {self.input_size}",
        )
        _check(
            self.device == "cpu" or self.device.startswith("cuda"),
            f"--device must be cpu or cuda[:N], got '{self.device}'",
        )


@dataclass(frozen=True)
class EngineConfig:
    """Score-CAM options, as :class:`scorecam_stream.ScoreCAM` takes them."""

    batch_size: int = 32
    variant: str = "article"
    score: str | None = None  # None: the variant's (article: softmax)
    channel_softmax: bool | None = None  # None: the variant's (article: off)
    combine: str | None = None  # None: the variant's (article: normalized)
    skip_constant: bool = True
    max_channels: int | None = None
    dtype: str = "fp32"
    channels_last: bool = True
    compile: bool = False  # torch.compile the masked passes, in fixed-shape chunks

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(
            self.score in (None, "softmax", "logit", "logit_delta"),
            f"--score must be softmax, logit or logit_delta, got '{self.score}'",
        )
        _check(
            self.combine in (None, "normalized", "raw"),
            f"--combine must be normalized or raw, got '{self.combine}'",
        )
        _check(
            self.variant in ("article", "pytorch-grad-cam"),
            f"--variant must be article or pytorch-grad-cam, got '{self.variant}'",
        )
        _check(
            self.variant == "article"
            or (
                self.score in (None, "logit")
                and self.channel_softmax in (None, True)
                and self.combine in (None, "raw")
            ),
            "--variant pytorch-grad-cam sets --score logit, --channel-softmax and --combine raw; "
            "drop the others",
        )
        _check(
            self.max_channels is None or self.max_channels >= 1,
            f"--max-channels must be >= 1, got {self.max_channels}",
        )
        _check(
            self.dtype in ("fp32", "bf16", "fp16"),
            f"--dtype must be fp32, bf16 or fp16, got '{self.dtype}'",
        )

    def engine_kwargs(self) -> dict[str, Any]:
        """Return the keyword arguments of ScoreCAM for these options."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ExplainConfig:
    """Which class to explain in which frames.

    ``target``: "top1" (each frame's top class), "dominant" (the clip's most frequent top-1
    class, from a first classification pass), or a class id / class name.
    """

    target: str = "top1"
    topk: int = 1
    every: int = 1
    smooth: float = 0.0
    # The correlation with the exact maps to hold while reusing masked passes from frame to
    # frame (scorecam_stream.reuse); 1.0 = exact. None: exact for files, LIVE_FIDELITY live.
    fidelity: float | None = None

    def __post_init__(self) -> None:
        _check(
            self.fidelity is None
            or (
                isinstance(self.fidelity, (int, float))
                and not isinstance(self.fidelity, bool)
                and 0 < self.fidelity <= 1
            ),
            f"--fidelity must be in (0, 1], got {self.fidelity}",
        )
        _check(self.topk >= 1, f"--topk must be >= 1, got {self.topk}")
        _check(self.every >= 1, f"--every must be >= 1, got {self.every}")
        _check(0.0 <= self.smooth < 1.0, f"--smooth must be in [0, 1), got {self.smooth}")
        _check(
            self.topk == 1 or self.target == "top1",
            "--topk > 1 needs --target top1 (the top-k classes of each frame)",
        )

    def fidelity_for(self, live: bool) -> float:
        """Return the fidelity of a run: as given, else exact for files, LIVE_FIDELITY live."""
        if self.fidelity is not None:
            return float(self.fidelity)
        return LIVE_FIDELITY if live else 1.0


@dataclass(frozen=True)
class OutputConfig:
    """Where results go and how the video is written."""

    output: str | None = None
    overwrite: bool = False
    crf: int = 20
    layout: str = "overlay"
    colormap: str = "jet"
    alpha: float = 0.5
    scale: str = "running"
    save_maps: str | None = None
    jsonl: str | None = None
    preview: str | None = None
    hls_time: float = 2.0
    hls_list_size: int = 6
    output_size: tuple[int, int] | None = None  # (width, height); None: the input's

    def __post_init__(self) -> None:
        _check(0 <= self.crf <= 51, f"--crf must be in [0, 51], got {self.crf}")
        _check(
            self.output_size is None
            or (
                isinstance(self.output_size, tuple)
                and len(self.output_size) == 2
                and all(isinstance(v, int) and 16 <= v <= 8192 for v in self.output_size)
            ),
            f"--output-size must be WIDTHxHEIGHT, each 16 to 8192 pixels, got {self.output_size}",
        )
        _check(
            math.isfinite(self.hls_time) and self.hls_time > 0,
            f"--hls-time must be > 0 seconds, got {self.hls_time}",
        )
        _check(self.hls_list_size >= 0, f"--hls-list-size must be >= 0, got {self.hls_list_size}")
        _check(
            self.layout in LAYOUTS, f"--layout must be overlay or side-by-side, got '{self.layout}'"
        )
        _check(
            self.colormap in COLORMAPS,
            f"unknown --colormap '{self.colormap}' (e.g. jet, turbo, inferno, viridis)",
        )
        _check(0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], got {self.alpha}")
        _check(
            self.scale in ("running", "frame"),
            f"--scale must be running or frame, got '{self.scale}'",
        )
        _check(
            self.save_maps is None or self.save_maps.endswith(".npz"),
            f"--save-maps must name a .npz file, got '{self.save_maps}'",
        )
        _check(
            self.preview is None or self.preview.lower().endswith(".png"),
            f"--preview must name a .png file, got '{self.preview}'",
        )

    @property
    def paths(self) -> tuple[str, ...]:
        """Return the outputs named here (video, maps, records, preview), streams included."""
        named = (self.output, self.save_maps, self.jsonl, self.preview)
        return tuple(path for path in named if path)


def check_window(start: float | None, end: float | None, max_frames: int | None) -> None:
    """Raise ScoreCamError unless the window is valid: the one rule (config and video.py)."""
    for name, value in (("--start", start), ("--end", end)):
        _check(
            value is None
            or (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0),
            f"{name} must be a time >= 0 in seconds, got {value}",
        )
    _check(
        start is None or end is None or end > start,
        f"--end ({end}) must be after --start ({start})",
    )
    _check(end is None or end > 0, f"--end must be > 0 seconds, got {end}")
    _check(max_frames is None or max_frames >= 1, f"--max-frames must be >= 1, got {max_frames}")


RECONNECT_ATTEMPTS = 10  # default --reconnect of live network inputs
RECONNECT_MAX_DELAY_S = 30.0  # the backoff between attempts grows to this at most


@dataclass(frozen=True)
class SourceConfig:
    """How the input is opened and read: live (source pace, newest frame) or every frame.

    ``live``: None decides by the input (network URLs, ``-`` and devices are live).
    ``input_option``: FFmpeg demuxer/protocol options as ``KEY=VALUE`` strings.
    ``read_timeout``: seconds without data after which the input has ended (default 10 for
    live inputs, 30 for other URLs).
    ``reconnect``: attempts to reopen a live network input that broke off or ended, per outage
    (0: none; None: RECONNECT_ATTEMPTS for live network inputs, else none); the first waits
    ``reconnect_delay`` seconds, each next one twice as long (at most RECONNECT_MAX_DELAY_S).
    """

    live: bool | None = None
    input_format: str | None = None
    input_option: tuple[str, ...] = ()
    read_timeout: float | None = None
    reconnect: int | None = None
    reconnect_delay: float = 1.0

    def __post_init__(self) -> None:
        _check(
            isinstance(self.input_option, (tuple, list))
            and all(isinstance(o, str) and "=" in o.strip("=") for o in self.input_option),
            f"--input-option takes KEY=VALUE, got {self.input_option}",
        )
        _check(
            self.read_timeout is None
            or (math.isfinite(self.read_timeout) and self.read_timeout > 0),
            f"--read-timeout must be > 0 seconds, got {self.read_timeout}",
        )
        _check(
            self.reconnect is None
            or (
                isinstance(self.reconnect, int)
                and not isinstance(self.reconnect, bool)
                and self.reconnect >= 0
            ),
            f"--reconnect must be a number of attempts >= 0, got {self.reconnect}",
        )
        _check(
            isinstance(self.reconnect_delay, (int, float))
            and math.isfinite(self.reconnect_delay)
            and self.reconnect_delay > 0,
            f"--reconnect-delay must be > 0 seconds, got {self.reconnect_delay}",
        )
        _check(
            self.input_format is None or bool(self.input_format.strip()),
            "--input-format must name an FFmpeg input format (e.g. v4l2, mpegts)",
        )

    @property
    def options(self) -> dict[str, str]:
        """Return the FFmpeg options as a dict."""
        return dict(option.split("=", 1) for option in self.input_option)


@dataclass(frozen=True)
class WindowConfig:
    """Which part of the input is processed; ``duration``: seconds of source after its first."""

    start: float | None = None
    end: float | None = None
    max_frames: int | None = None
    duration: float | None = None

    def __post_init__(self) -> None:
        check_window(self.start, self.end, self.max_frames)
        _check(
            self.duration is None or (math.isfinite(self.duration) and self.duration > 0),
            f"--duration must be > 0 seconds, got {self.duration}",
        )


@dataclass(frozen=True)
class DistributedConfig:
    """How the masked passes are spread. ``workers == 0`` and ``gpus == 0``: in-process."""

    workers: int = 0
    gpus: int = 0
    address: str | None = None
    max_inflight_frames: int | None = None
    shards_per_frame: int | None = None
    startup_timeout: float = 120.0
    max_shard_retries: int = 2
    threads_per_worker: int | None = None  # CPU workers; default: the cluster's CPUs / workers
    workers_per_gpu: int = 1  # Ray actors sharing each GPU (1/K of a GPU each)

    def __post_init__(self) -> None:
        _check(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        _check(self.gpus >= 0, f"--gpus must be >= 0, got {self.gpus}")
        _check(
            not (self.workers and self.gpus),
            "give --gpus N (one worker per GPU) or --workers N (CPU workers), not both",
        )
        _check(
            self.max_inflight_frames is None or self.max_inflight_frames >= 1,
            f"--max-inflight-frames must be >= 1, got {self.max_inflight_frames}",
        )
        _check(
            self.shards_per_frame is None or self.shards_per_frame >= 1,
            f"--shards-per-frame must be >= 1, got {self.shards_per_frame}",
        )
        _check(self.startup_timeout > 0, "--startup-timeout must be > 0")
        _check(self.max_shard_retries >= 0, "--max-shard-retries must be >= 0")
        _check(
            self.threads_per_worker is None or self.threads_per_worker >= 1,
            f"--threads-per-worker must be >= 1, got {self.threads_per_worker}",
        )
        _check(
            self.workers_per_gpu >= 1, f"--workers-per-gpu must be >= 1, got {self.workers_per_gpu}"
        )
        _check(
            self.workers_per_gpu == 1 or self.gpus >= 1,
            "--workers-per-gpu needs --gpus N (it sets how many workers share each GPU)",
        )

    @property
    def uses_ray(self) -> bool:
        """Return whether Ray workers are used."""
        return bool(self.workers or self.gpus or self.address)

    @property
    def num_workers(self) -> int:
        """Return the number of Ray workers (1 when only --address is given)."""
        return self.gpus * self.workers_per_gpu or self.workers or 1


@dataclass(frozen=True)
class EvaluationConfig:
    """Faithfulness metrics of the maps (``--metrics``) and a baseline method to compare."""

    metrics: bool = False
    baseline: str | None = None  # "gradcam"; implies the metrics
    metric_steps: int = 28  # insertion/deletion steps (RISE)

    def __post_init__(self) -> None:
        _check(
            self.baseline in (None, "gradcam"),
            f"--baseline must be gradcam, got '{self.baseline}'",
        )
        _check(self.metric_steps >= 1, f"--metric-steps must be >= 1, got {self.metric_steps}")

    @property
    def enabled(self) -> bool:
        """Return whether the metric passes run."""
        return bool(self.metrics or self.baseline)


@dataclass(frozen=True)
class MonitoringConfig:
    """Prometheus metrics of a live run: served at ``http://ADDR:PORT/metrics`` while it runs.

    ``prometheus_port``: None serves none. ``prometheus_addr``: the address to listen on
    (all of this host's by default: a monitoring port is scraped from another host).
    """

    prometheus_port: int | None = None
    prometheus_addr: str = "0.0.0.0"

    def __post_init__(self) -> None:
        _check(
            self.prometheus_port is None
            or (
                isinstance(self.prometheus_port, int)
                and not isinstance(self.prometheus_port, bool)
                and 1 <= self.prometheus_port <= 65535
            ),
            f"--prometheus-port must be a TCP port, 1 to 65535, got {self.prometheus_port}",
        )
        _check(
            isinstance(self.prometheus_addr, str) and bool(self.prometheus_addr.strip()),
            f"--prometheus-addr must be an address to listen on, got {self.prometheus_addr!r}",
        )


@dataclass(frozen=True)
class Config:
    """Everything one run needs."""

    input: str
    source: SourceConfig = field(default_factory=SourceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    quiet: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.input), "no input given")
        _check(
            self.engine.max_channels is None or self.explain.fidelity in (None, 1, 1.0),
            "--fidelity below 1 needs every channel: drop --max-channels",
        )


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
    """

    inputs: tuple[str, ...]
    output_dir: str | None = None
    maps_dir: str | None = None
    jsonl_dir: str | None = None
    preview_dir: str | None = None
    summary: str | None = None
    max_inflight_videos: int | None = None
    video_tasks: bool = False

    def __post_init__(self) -> None:
        _check(
            isinstance(self.inputs, tuple) and len(self.inputs) > 0 and all(self.inputs),
            "no input given",
        )
        _check(
            self.max_inflight_videos is None
            or (isinstance(self.max_inflight_videos, int) and self.max_inflight_videos >= 1),
            f"--max-inflight-videos must be >= 1, got {self.max_inflight_videos}",
        )

    def inflight_videos(self, uses_ray: bool) -> int:
        """Return how many videos run at once: as given, else 2 with Ray workers, else 1.

        Two with workers so that none idles while one video's decoder starts or its encoder
        finishes; one in-process, where the single model replica is the bottleneck anyway.
        """
        if self.max_inflight_videos is not None:
            return self.max_inflight_videos
        return 2 if uses_ray else 1


# Flat setting name -> (section, field). Names are the flags with underscores.
_SECTIONS = {
    "source": SourceConfig,
    "model": ModelConfig,
    "engine": EngineConfig,
    "explain": ExplainConfig,
    "output": OutputConfig,
    "window": WindowConfig,
    "distributed": DistributedConfig,
    "evaluation": EvaluationConfig,
    "monitoring": MonitoringConfig,
}
FIELDS: dict[str, tuple[str, str]] = {
    ("model" if f.name == "spec" else f.name): (section, f.name)  # --model sets the spec
    for section, cls in _SECTIONS.items()
    for f in dataclasses.fields(cls)
}


def build_config(input_path: str, settings: dict[str, Any], quiet: bool = False) -> Config:
    """Return a validated Config from flat settings (YAML keys / flags with underscores)."""
    unknown = sorted(set(settings) - set(FIELDS))
    _check(not unknown, f"unknown setting(s): {', '.join(unknown)}")
    grouped: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in settings.items():
        section, name = FIELDS[key]
        grouped[section][name] = value
    try:
        sections = {name: _SECTIONS[name](**values) for name, values in grouped.items()}
    except TypeError as err:  # a wrongly typed YAML value that the checks could not compare
        raise ScoreCamError(f"invalid setting: {err}") from None
    model = sections["model"]
    if sections["distributed"].gpus and model.device == "cpu":
        # --gpus means the workers run on CUDA.
        sections["model"] = dataclasses.replace(model, device="cuda")
    return Config(input=input_path, quiet=quiet, **sections)
