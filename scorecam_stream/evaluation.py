"""Faithfulness of a run's maps, frame by frame: the ``--metrics`` / ``--baseline`` stage.

Two halves. :class:`FrameScorer` runs where the model is (in the worker that made the map, a Ray
actor or this process): it scores a frame's map (the first target's) with the metrics of
:mod:`scorecam_stream.metrics` and, with a baseline, computes the baseline's map for the same
frame and target and scores it too. :class:`Evaluator` runs in the pipeline: it turns each
result's scores into record fields and keeps running means, not maps, so memory stays flat
for any video length; stability compares each map with the previous explained frame's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .choices import BASELINES, spelled
from .config import Config
from .gradcam import GradCAM
from .metrics import average_drop_increase, insertion_deletion, stability
from .records import FrameResult, FrameScores

METRIC_KEYS = ("average_drop", "increase", "insertion", "deletion")


@dataclass
class _Means:
    """Running sums of one method's per-frame metrics and its consecutive-frame stability."""

    frames: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRIC_KEYS, 0.0))
    milliseconds: float = 0.0
    pairs: int = 0
    correlation_sum: float = 0.0
    correlations: int = 0  # pairs whose correlation is defined (neither map constant)
    iou_sum: float = 0.0
    previous: tuple[torch.Tensor, int] | None = None

    def add(self, fields: dict[str, float], map_: torch.Tensor, target: int, ms: float) -> None:
        self.frames += 1
        for key in METRIC_KEYS:
            self.sums[key] += fields[key]
        self.milliseconds += ms
        if self.previous is not None:
            pair = stability(
                torch.stack([self.previous[0], map_]), torch.tensor([self.previous[1], target])
            )
            if pair["pairs"]:  # the same target in both frames
                self.pairs += 1
                self.iou_sum += cast(float, pair["iou"])  # a float where there are pairs
            if pair["correlation"] is not None:
                self.correlation_sum += pair["correlation"]
                self.correlations += 1
        self.previous = (map_, target)

    def summary(self) -> dict[str, Any]:
        n = max(self.frames, 1)
        means = {key: round(self.sums[key] / n, 6) for key in METRIC_KEYS}
        return {
            "frames": self.frames,
            **means,
            "ad_percent": round(100 * means["average_drop"], 3),  # the paper's AD
            "ai_percent": round(100 * means["increase"], 3),  # the paper's AI
            "stability_pairs": self.pairs,
            "stability_correlation": _mean(self.correlation_sum, self.correlations),
            "stability_iou": _mean(self.iou_sum, self.pairs),
            "milliseconds_per_frame": round(self.milliseconds / n, 3),
        }


class FrameScorer:
    """Scores one frame's map where the model is: 2 x steps + 4 forwards per method.

    ``steps``: insertion/deletion steps; ``batch_size``: metric passes per forward;
    ``baseline``: None or ``"gradcam"``.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module,
        steps: int = 28,
        batch_size: int = 32,
        baseline: str | None = None,
    ) -> None:
        if baseline is not None and baseline not in BASELINES:
            raise ValueError(f"baseline must be {spelled(BASELINES)}, got '{baseline}'")
        self.model = model
        self.steps = steps
        self.batch_size = batch_size
        self.baseline = baseline
        self._gradcam = GradCAM(model, layer, batch_size=batch_size) if baseline else None

    def __call__(
        self, x: torch.Tensor, map_: torch.Tensor | np.ndarray, target: int
    ) -> FrameScores:
        """Return the scores of ``map_`` (S, S) for model input ``x`` (3, S, S) and ``target``."""
        map_ = torch.as_tensor(map_).detach().float().cpu()
        fields = self._score(x[None], map_, target)
        if self._gradcam is None:
            return FrameScores(fields)
        began = time.perf_counter()
        base_map = self._gradcam(x[None], torch.tensor([target])).maps[0].cpu()
        ms = (time.perf_counter() - began) * 1000
        base_fields = {**self._score(x[None], base_map, target), "milliseconds": round(ms, 3)}
        baseline = cast(str, self.baseline)  # set with the Grad-CAM it names
        return FrameScores({**fields, baseline: base_fields}, base_map.numpy())

    def _score(self, x: torch.Tensor, map_: torch.Tensor, target: int) -> dict[str, float]:
        targets = torch.tensor([target])
        drop, increase = average_drop_increase(self.model, x, map_[None], targets, self.batch_size)
        ins, dele = insertion_deletion(
            self.model, x, map_[None], targets, self.steps, self.batch_size
        )
        values = {"average_drop": drop, "increase": increase, "insertion": ins, "deletion": dele}
        return {key: round(float(v[0]), 6) for key, v in values.items()}


class Evaluator:
    """Collects the explained frames' scores: ``add`` gives record fields, ``summary`` the means."""

    def __init__(self, baseline: str | None = None) -> None:
        self.baseline = baseline
        self._means = {"scorecam": _Means(), **({baseline: _Means()} if baseline else {})}

    def add(self, result: FrameResult) -> dict[str, Any]:
        """Return the record fields of one explained frame, scored by its worker."""
        scores = result.scores
        if scores is None:
            raise RuntimeError(f"frame {result.index} was not scored: start workers with metrics")
        target = int(result.targets[0])
        map_ = torch.tensor(result.maps[0], dtype=torch.float32)  # a copy: Ray's may be read-only
        self._means["scorecam"].add(scores.fields, map_, target, result.seconds * 1000)
        if self.baseline is not None:
            assert scores.baseline_map is not None
            base = scores.fields[self.baseline]
            base_map = torch.tensor(scores.baseline_map, dtype=torch.float32)
            self._means[self.baseline].add(base, base_map, target, base["milliseconds"])
        return scores.fields

    def summary(self) -> dict[str, dict[str, Any]]:
        """Return each method's means, AD/AI x100, stability and ms per frame, by method name."""
        return {name: means.summary() for name, means in self._means.items()}


def make_evaluator(config: Config) -> Evaluator | None:
    """Return the run's Evaluator, or None without ``--metrics``/``--baseline``."""
    options = config.evaluation
    return Evaluator(options.baseline) if options.enabled else None


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """Return the methods' summaries as a text table (AD/AI x100 as in the paper)."""
    head = (
        f"{'method':<10} {'frames':>6} {'AD %':>7} {'AI %':>7} {'insertion':>9} "
        f"{'deletion':>8} {'stab. r':>7} {'top10% IoU':>10} {'ms/frame':>9}"
    )
    lines = [head]
    for name, s in summary.items():
        lines.append(
            f"{name:<10} {s['frames']:>6} {s['ad_percent']:>7.2f} {s['ai_percent']:>7.2f} "
            f"{s['insertion']:>9.4f} {s['deletion']:>8.4f} "
            f"{_cell(s['stability_correlation']):>7} {_cell(s['stability_iou']):>10} "
            f"{s['milliseconds_per_frame']:>9.1f}"
        )
    return "\n".join(lines)


def _mean(total: float, count: int) -> float | None:
    return round(total / count, 6) if count else None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
