"""scorecam-stream: Score-CAM explanations for every frame of a video.

The public names load their modules (and torch) on first use, so that ``scorecam-video
--version`` and ``--help`` answer without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ScoreCamError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "LoadedModel": "models",
    "load_model": "models",
    "BasePass": "weighting",
    "ScoreCAM": "scorecam",
    "ScoreCAMResult": "weighting",
    "ShardResult": "weighting",
    "combine_shards": "weighting",
}

if TYPE_CHECKING:
    from .models import LoadedModel, load_model
    from .scorecam import ScoreCAM
    from .weighting import BasePass, ScoreCAMResult, ShardResult, combine_shards


def __getattr__(name: str) -> Any:
    """Return a public name, importing its module the first time."""
    if name not in _LAZY:
        raise AttributeError(f"module 'scorecam_stream' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "BasePass",
    "LoadedModel",
    "ScoreCAM",
    "ScoreCAMResult",
    "ScoreCamError",
    "ShardResult",
    "__version__",
    "combine_shards",
    "load_model",
]
