"""What travels between the stages: a frame to explain, its result, its scores, a run's summary.

A leaf module (numpy and torch only): the workers make these records, the explainers carry
them, the file and live loops, the evaluation and the batch runner read them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # the type only: reuse.py imports the engine
    from .reuse import Outcome

Progress = Callable[[int, int | None], None]  # (frames done, frames expected or None)


@dataclass(frozen=True)
class FrameTask:
    """One frame to explain: its model input and, if fixed, the classes to explain."""

    index: int  # unique in a run; the workers' activation cache is keyed by it
    # The frame resized to the model input, (S, S, 3) uint8 (normalised by the worker, on its
    # device), or the model input (3, S, S) float32; never the full-resolution frame.
    x: torch.Tensor
    targets: tuple[int, ...] | None = None  # None: the frame's top-k classes


@dataclass(frozen=True, eq=False)
class FrameScores:
    """One frame's metrics: its record fields, and the baseline's map for the stability."""

    fields: dict[str, Any]  # the four metric keys; with a baseline, {name: {keys, milliseconds}}
    baseline_map: np.ndarray | None = None  # (S, S) float32


@dataclass(frozen=True, eq=False)
class FrameResult:
    """The Score-CAM maps of one frame."""

    index: int
    maps: np.ndarray  # (T, S, S) float32, ReLU applied, not rescaled
    targets: np.ndarray  # (T,) int64
    probs: np.ndarray  # (T,) float32 softmax probability of each target, unmasked input
    skipped: int  # constant channels whose masked pass was skipped
    seconds: float  # time spent computing this frame
    scores: FrameScores | None = None  # --metrics: the first map's faithfulness (evaluation.py)
    passes: int = 0  # masked passes run for this frame
    reused: int = 0  # channels whose cached result was reused (--fidelity below 1)
    keyframe: bool = False  # every channel recomputed, and the reuse measured (--fidelity)
    fidelity: float | None = None  # keyframes: correlation of the reuse map with the exact one


def make_result(
    index: int,
    maps: torch.Tensor,
    targets: torch.Tensor,
    probs: torch.Tensor,
    skipped: int,
    seconds: float,
    passes: int,
    outcome: Outcome | None = None,
) -> FrameResult:
    """Return a FrameResult from one frame's maps (T, S, S), targets (T,) and their probs (T,).

    ``outcome``: what reuse did for the frame (``--fidelity`` below 1); its passes count.
    """
    return FrameResult(
        index=index,
        maps=maps.detach().cpu().numpy().astype(np.float32, copy=False),
        targets=targets.cpu().numpy().astype(np.int64),
        probs=probs.cpu().numpy().astype(np.float32),
        skipped=int(skipped),
        seconds=seconds,
        passes=passes if outcome is None else outcome.passes,
        reused=0 if outcome is None else outcome.reused,
        keyframe=False if outcome is None else outcome.keyframe,
        fidelity=None if outcome is None else outcome.fidelity,
    )


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
    # Live runs: frame arrival -> its map ready, over the maps after the first (steady state);
    # the first map's also waited for the model to load (or Ray to start): startup_ms.
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    startup_ms: float | None = None
    metrics: dict[str, Any] | None = None  # --metrics: each method's means (evaluation.py)
    cost: dict[str, Any] | None = None  # masked passes per explained frame, fidelity (reuse.py)
    metrics_table: str | None = None  # the same as a text table
