"""The model's state while a method runs it: eval mode, grad mode, memory format, hooks.

Score-CAM, Grad-CAM and the faithfulness metrics run a caller's model; each touches its state
only inside these context managers, which put everything back in ``finally`` (also after an
exception), so the caller gets its model as it gave it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """Return the device of the model's first parameter (``default`` if it has none)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device(default)


@contextlib.contextmanager
def model_state(
    model: nn.Module, *, channels_last: bool = False, grad: bool = False
) -> Iterator[None]:
    """Hold ``model`` in eval mode, under inference mode (``grad=True``: gradients on).

    ``channels_last`` converts the model's 4-D weights and buffers to channels-last while held.
    On exit the mode, the grad mode and the caller's very tensors (no copy back, exact strides)
    are put back. Nesting is safe: an inner hold finds the state already set and keeps it.
    """
    was_training = model.training
    # The caller's tensors, put back untouched afterwards (no copy back, exact strides).
    originals = {}
    if channels_last:
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                originals[t] = t.data
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    model.eval()
    try:
        with torch.enable_grad() if grad else torch.inference_mode():
            yield
    finally:
        model.train(was_training)
        for t, data in originals.items():
            t.data = data


@contextlib.contextmanager
def forward_hook(layer: nn.Module, hook: Callable[..., Any]) -> Iterator[None]:
    """Hold a forward hook on ``layer``; removed even if the forward raises."""
    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
