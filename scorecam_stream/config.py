"""Configuration: frozen dataclasses, validated on construction, passed down explicitly.

:class:`Config` is everything one run needs: the sections of what is explained and how (model,
engine, explain, evaluation), how the work is spread and watched (distributed, monitoring), and
the input and outputs (:mod:`scorecam_stream.config_video`). Many inputs in one run add a
:class:`~scorecam_stream.config_batch.BatchConfig`.

Only :mod:`scorecam_stream.cli` reads argv and YAML files; it builds a :class:`Config` with
:func:`build_config` from flat ``key: value`` settings whose keys are the command-line flags
with underscores (``batch_size: 32``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .choices import BASELINES, COMBINES, DTYPES, FITS, SCORES, VARIANTS, spelled
from .config_checks import require
from .config_video import OutputConfig, SourceConfig, WindowConfig
from .errors import ScoreCamError

# --fidelity of live runs when not given: a map sooner matters more there (docs/benchmarks.md).
LIVE_FIDELITY = 0.99


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
            require(
                value is None
                or (
                    isinstance(value, tuple)
                    and len(value) == 3
                    and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
                ),
                f"{name} must be three numbers R,G,B (e.g. 0.5,0.5,0.5), got {value!r}",
            )
        require(
            self.std is None or min(self.std) > 0, f"--std must be > 0 in every channel: {self.std}"
        )
        require(self.fit in FITS, f"--fit must be {spelled(FITS)}, got '{self.fit}'")
        require(
            self.input_size is None or self.input_size >= 16,
            f"--input-size must be at least 16, got {self.input_size}",
        )
        require(
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
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(
            self.score is None or self.score in SCORES,
            f"--score must be {spelled(SCORES)}, got '{self.score}'",
        )
        require(
            self.combine is None or self.combine in COMBINES,
            f"--combine must be {spelled(COMBINES)}, got '{self.combine}'",
        )
        require(
            self.variant in VARIANTS,
            f"--variant must be {spelled(VARIANTS)}, got '{self.variant}'",
        )
        require(
            self.variant == "article"
            or (
                self.score in (None, "logit")
                and self.channel_softmax in (None, True)
                and self.combine in (None, "raw")
            ),
            "--variant pytorch-grad-cam sets --score logit, --channel-softmax and --combine raw; "
            "drop the others",
        )
        require(
            self.max_channels is None or self.max_channels >= 1,
            f"--max-channels must be >= 1, got {self.max_channels}",
        )
        require(self.dtype in DTYPES, f"--dtype must be {spelled(DTYPES)}, got '{self.dtype}'")

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
        require(
            self.fidelity is None
            or (
                isinstance(self.fidelity, (int, float))
                and not isinstance(self.fidelity, bool)
                and 0 < self.fidelity <= 1
            ),
            f"--fidelity must be in (0, 1], got {self.fidelity}",
        )
        require(self.topk >= 1, f"--topk must be >= 1, got {self.topk}")
        require(self.every >= 1, f"--every must be >= 1, got {self.every}")
        require(0.0 <= self.smooth < 1.0, f"--smooth must be in [0, 1), got {self.smooth}")
        require(
            self.topk == 1 or self.target == "top1",
            "--topk > 1 needs --target top1 (the top-k classes of each frame)",
        )

    def fidelity_for(self, live: bool) -> float:
        """Return the fidelity of a run: as given, else exact for files, LIVE_FIDELITY live."""
        if self.fidelity is not None:
            return float(self.fidelity)
        return LIVE_FIDELITY if live else 1.0


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
        require(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        require(self.gpus >= 0, f"--gpus must be >= 0, got {self.gpus}")
        require(
            not (self.workers and self.gpus),
            "give --gpus N (one worker per GPU) or --workers N (CPU workers), not both",
        )
        require(
            self.max_inflight_frames is None or self.max_inflight_frames >= 1,
            f"--max-inflight-frames must be >= 1, got {self.max_inflight_frames}",
        )
        require(
            self.shards_per_frame is None or self.shards_per_frame >= 1,
            f"--shards-per-frame must be >= 1, got {self.shards_per_frame}",
        )
        require(self.startup_timeout > 0, "--startup-timeout must be > 0")
        require(self.max_shard_retries >= 0, "--max-shard-retries must be >= 0")
        require(
            self.threads_per_worker is None or self.threads_per_worker >= 1,
            f"--threads-per-worker must be >= 1, got {self.threads_per_worker}",
        )
        require(
            self.workers_per_gpu >= 1, f"--workers-per-gpu must be >= 1, got {self.workers_per_gpu}"
        )
        require(
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
        require(
            self.baseline is None or self.baseline in BASELINES,
            f"--baseline must be {spelled(BASELINES)}, got '{self.baseline}'",
        )
        require(self.metric_steps >= 1, f"--metric-steps must be >= 1, got {self.metric_steps}")

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
        require(
            self.prometheus_port is None
            or (
                isinstance(self.prometheus_port, int)
                and not isinstance(self.prometheus_port, bool)
                and 1 <= self.prometheus_port <= 65535
            ),
            f"--prometheus-port must be a TCP port, 1 to 65535, got {self.prometheus_port}",
        )
        require(
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
        require(bool(self.input), "no input given")
        require(
            self.engine.max_channels is None or self.explain.fidelity in (None, 1, 1.0),
            "--fidelity below 1 needs every channel: drop --max-channels",
        )


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
    require(not unknown, f"unknown setting(s): {', '.join(unknown)}")
    grouped: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in settings.items():
        section, name = FIELDS[key]
        grouped[section][name] = value
    if grouped["distributed"].get("gpus") and grouped["model"].get("device", "cpu") == "cpu":
        # --gpus means the workers run on CUDA: the device is set before validation, so that
        # the ModelConfig is final (DistributedConfig keeps ``gpus`` as given, so its truth is
        # the validated value's).
        grouped["model"]["device"] = "cuda"
    try:
        sections = {name: _SECTIONS[name](**values) for name, values in grouped.items()}
    except (TypeError, AttributeError) as err:
        # A wrongly typed YAML value that the checks could not compare (5 < "a") or call a
        # string method on (device: 5): the user's mistake, one line.
        raise ScoreCamError(f"invalid setting: {err}") from None
    return Config(input=input_path, quiet=quiet, **sections)
