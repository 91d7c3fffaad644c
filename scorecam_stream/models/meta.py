"""What the driver needs of a model, without its weights: its preprocessing and class names.

:class:`ModelMeta` travels to every process that prepares frames; :class:`LoadedModel` is a
model with its target layer and meta. :func:`preprocess_frame` turns an RGB frame into the
normalised model input, the frame made square by :mod:`scorecam_stream.fit`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from ..choices import FITS, spelled
from ..errors import ScoreCamError
from ..fit import fit_frame
from ..targets import class_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelMeta:
    """What the driver needs of a model (no weights): its preprocessing and class names.

    ``preprocess`` maps an RGB uint8 (H, W, 3) frame to a float tensor (3, S, S) normalised
    with ``mean``/``std``; ``fit`` says how a non-square frame becomes S x S (:mod:`.fit`).
    """

    name: str
    layer_name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    fit: str = "squash"

    def preprocess(self, frame: np.ndarray) -> torch.Tensor:
        """Return the model input (3, S, S) float32 for one RGB uint8 frame."""
        return preprocess_frame(frame, self.input_size, self.mean, self.std, self.fit)

    def preprocess_batch(self, frames: list[np.ndarray]) -> torch.Tensor:
        """Return the model input (N, 3, S, S) float32 for a list of RGB uint8 frames."""
        return torch.stack([self.preprocess(f) for f in frames])

    def class_name(self, index: int) -> str:
        """Return the human name of a class id (the id itself if the model has no names)."""
        return class_name(self.class_names, index)


@dataclass(frozen=True)
class LoadedModel:
    """A classifier ready for Score-CAM: the module, its target layer, and its :class:`ModelMeta`.

    The meta's fields (``mean``, ``std``, ``input_size``...) and methods (``preprocess``,
    ``class_name``) are reachable on the LoadedModel itself, read-only.
    """

    model: nn.Module
    layer: nn.Module
    meta: ModelMeta

    name = property(lambda self: self.meta.name, doc="The model spec.")
    layer_name = property(lambda self: self.meta.layer_name, doc="The target layer's path.")
    input_size = property(lambda self: self.meta.input_size, doc="The model input's side S.")
    mean = property(lambda self: self.meta.mean, doc="The RGB mean used to normalise.")
    std = property(lambda self: self.meta.std, doc="The RGB std used to normalise.")
    class_names = property(lambda self: self.meta.class_names, doc="Names by class id.")
    fit = property(lambda self: self.meta.fit, doc="How frames become square.")

    def preprocess(self, frame: np.ndarray) -> torch.Tensor:
        """Return the model input (3, S, S) float32 for one RGB uint8 frame."""
        return self.meta.preprocess(frame)

    def preprocess_batch(self, frames: list[np.ndarray]) -> torch.Tensor:
        """Return the model input (N, 3, S, S) float32 for a list of RGB uint8 frames."""
        return self.meta.preprocess_batch(frames)

    def class_name(self, index: int) -> str:
        """Return the human name of a class id (the id itself if the model has no names)."""
        return self.meta.class_name(index)


def preprocess_frame(
    frame: np.ndarray,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    fit: str = "squash",
) -> torch.Tensor:
    """Return the normalised (3, size, size) float32 tensor of an RGB uint8 frame (see fit)."""
    x = resize_frame(frame, size, fit).astype(np.float32) * (1.0 / 255.0)
    x -= np.asarray(mean, dtype=np.float32)
    x /= np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def resize_frame(frame: np.ndarray, size: int, fit: str = "squash") -> np.ndarray:
    """Return the RGB uint8 frame (H, W, 3) made square and resized to (size, size, 3) uint8.

    ``fit``: ``squash`` resizes the whole frame to a square (aspect not kept), ``pad`` fits it
    inside a black square, ``crop`` keeps its centred square (see :mod:`.fit`).
    """
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ScoreCamError(f"expected an RGB frame of shape (H, W, 3), got {frame.shape}")
    if fit not in FITS:
        raise ScoreCamError(f"fit must be {spelled(FITS)}, got '{fit}'")
    frame = fit_frame(frame, fit)
    h, w = frame.shape[:2]
    # INTER_AREA averages when shrinking (no aliasing), bilinear when enlarging.
    interp = cv2.INTER_AREA if (h > size or w > size) else cv2.INTER_LINEAR
    return cv2.resize(frame, (size, size), interpolation=interp)
