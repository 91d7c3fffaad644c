"""What the file loop and the live loop share, frame by frame.

A decoded frame goes in as :func:`model_input`; each explained frame comes back to a
:class:`FrameSink`, which keeps the heat drawn, appends the maps archive, scores the map
(``--metrics``), counts its cost (:class:`~scorecam_stream.reuse.ReuseTally`) and writes its
record. The two loops differ only in how they pick frames (:mod:`~scorecam_stream.file_run`:
every frame in order; :mod:`~scorecam_stream.live`: the newest one when the explainer is free).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .annotate import MapDisplay, frame_record
from .config import Config
from .evaluation import format_table, make_evaluator
from .models import ModelMeta, resize_frame
from .outputs import Outputs
from .records import FrameResult
from .reuse import ReuseOptions, ReuseTally
from .video import Frame


def model_input(image: np.ndarray, meta: ModelMeta) -> torch.Tensor:
    """Return what travels to the worker for a decoded frame: (S, S, 3) uint8, resized.

    A quarter of the bytes of the float input; the worker normalises it on its device.
    """
    return torch.from_numpy(resize_frame(image, meta.input_size, meta.fit))


def reuse_options(config: Config, live: bool) -> ReuseOptions:
    """Return how a run's stream reuses masked passes: ``--fidelity``, else the default.

    Files are exact by default; live runs reuse (a map sooner is the point of them), except
    with ``--max-channels``, whose channel selection changes from frame to frame.
    """
    if config.explain.fidelity is None and config.engine.max_channels is not None:
        return ReuseOptions()
    return ReuseOptions(fidelity=config.explain.fidelity_for(live))


class FrameSink:
    """Takes a run's explained frames: heat to draw, maps archive, metrics, cost, records."""

    def __init__(self, config: Config, meta: ModelMeta, outputs: Outputs) -> None:
        self.meta = meta
        self.outputs = outputs
        self.many = config.explain.topk > 1  # the archive keeps every target's map
        self.display = MapDisplay(config.explain.smooth, config.output.scale)
        self.evaluator = make_evaluator(config)
        self.tally = ReuseTally()
        self.explained = 0

    def add(self, result: FrameResult, frame: Frame) -> tuple[np.ndarray, dict[str, Any]]:
        """Take one explained frame; return (its heat to draw, its metric record fields)."""
        self.explained += 1
        self.tally.add(result)
        heat = self.display(result)
        self.outputs.add_maps(result, frame, self.many)
        scores = self.evaluator.add(result) if self.evaluator is not None else {}
        return heat, scores

    def record(
        self, result: FrameResult, frame: Frame, reused: bool, fields: dict[str, Any]
    ) -> None:
        """Write the record of ``frame``, drawn with ``result``'s map, plus ``fields``."""
        if self.outputs.records is not None:
            record = frame_record(self.meta, result, frame, reused=reused)
            self.outputs.records.add({**record, **fields})

    def metrics(self) -> dict[str, dict[str, Any]] | None:
        """Return each method's metric means (``--metrics``), or None."""
        return self.evaluator.summary() if self.evaluator is not None else None

    def summary_fields(self) -> dict[str, Any]:
        """Return the cost and metric fields of the run's ``{"summary": ...}`` record."""
        return {**self.tally.summary(), **(self.metrics() or {})}

    def summary_parts(self) -> dict[str, Any]:
        """Return the RunSummary fields this sink knows: metrics, their table, the cost."""
        metrics = self.metrics()
        return {
            "metrics": metrics,
            "metrics_table": format_table(metrics) if metrics else None,
            "cost": self.tally.summary(),
        }
