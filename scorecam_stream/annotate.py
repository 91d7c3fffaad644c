"""What each frame's output says: the class explained, its label and record, the map drawn.

Shared by the file loop and the live loop.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from .choices import Scale
from .models import ModelMeta
from .records import FrameResult
from .render import MapScaler
from .video import Frame


class MapDisplay:
    """Turns each explained frame's first map into the heat drawn: smoothed, display-scaled.

    Maps of another class are other evidence: not averaged in (``--smooth``), and shown on that
    class's own display scale, not the previous class's peak.
    """

    def __init__(self, smooth: float, scale: str) -> None:
        self._weight = smooth
        self._scaler = MapScaler(cast(Scale, scale))  # validated by the config
        self._smoothed: np.ndarray | None = None
        self._target = -1

    def __call__(self, result: FrameResult) -> np.ndarray:
        """Return the map in [0, 1] to draw for ``result``."""
        first, target = result.maps[0], int(result.targets[0])
        a = self._weight
        fresh = self._smoothed is None or a == 0 or target != self._target
        self._smoothed = first if fresh else a * cast(np.ndarray, self._smoothed) + (1 - a) * first
        self._target = target
        return self._scaler(self._smoothed, key=target)


def frame_label(meta: ModelMeta, result: FrameResult, frame: Frame, reused: bool) -> str:
    """Return the label drawn on ``frame``: class, probability, time, and the map's origin."""
    name = meta.class_name(int(result.targets[0]))
    minutes, seconds = divmod(max(frame.seconds, 0.0), 60)
    text = f"{name} {result.probs[0]:.2f}  {int(minutes):02d}:{seconds:05.2f}"
    return f"{text}  (map of frame {result.index})" if reused else text


def frame_record(
    meta: ModelMeta, result: FrameResult, frame: Frame, reused: bool
) -> dict[str, Any]:
    """Return the jsonl record of ``frame`` drawn with ``result``'s map."""
    return {
        "index": frame.index,
        "pts_seconds": round(frame.seconds, 6),
        "target": int(result.targets[0]),
        "name": meta.class_name(int(result.targets[0])),
        "probability": round(float(result.probs[0]), 6),
        "targets": [int(t) for t in result.targets],
        "probabilities": [round(float(p), 6) for p in result.probs],
        "skipped": result.skipped,
        "milliseconds": 0.0 if reused else round(result.seconds * 1000, 3),
        "map_of_frame": result.index,
        # What this frame's own explanation cost (nothing when it shows another frame's map).
        "passes": 0 if reused else result.passes,
        "reused": 0 if reused else result.reused,
        "keyframe": False if reused else result.keyframe,
        "fidelity": None if reused or result.fidelity is None else round(result.fidelity, 6),
    }
