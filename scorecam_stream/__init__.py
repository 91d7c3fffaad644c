"""scorecam-stream: Score-CAM explanations for every frame of a video."""

from .errors import ScoreCamError
from .models import LoadedModel, load_model
from .scorecam import BasePass, ScoreCAM, ScoreCAMResult, ShardResult, combine_shards

__version__ = "0.1.0"

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
