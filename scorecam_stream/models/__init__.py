"""Model specs -> (model, target layer, preprocessing, class names).

- :mod:`.zoo`: :func:`load_model` (torchvision, timm, the offline EfficientNet-Lite0), each
  model's own preprocessing and default layer.
- :mod:`.meta`: :class:`ModelMeta` (what the driver needs of a model, no weights),
  :class:`LoadedModel`, and the frame -> model input preprocessing.
- :mod:`.checkpoints`: a local weights file into a model; lukemelas' EfficientNet keys -> timm's.
- :mod:`.layers`: the target layer by name, or the last spatial feature map detected.
"""

from .meta import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    ModelMeta,
    preprocess_frame,
    resize_frame,
)
from .zoo import load_model

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadedModel",
    "ModelMeta",
    "load_model",
    "preprocess_frame",
    "resize_frame",
]
