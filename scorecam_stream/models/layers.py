"""Target layers: a layer found by its dotted name, or the last spatial feature map detected."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ScoreCamError

_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# Pass-through modules: their output is their input, they name nothing new.
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten)


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
