"""The values an option can take: one home, read by the config checks, the engine and the help.

A leaf module (no torch): the command line validates its options with it before torch loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

Variant = Literal["article", "pytorch-grad-cam"]
Score = Literal["softmax", "logit", "logit_delta"]
Combine = Literal["normalized", "raw"]
Dtype = Literal["fp32", "bf16", "fp16"]
Fit = Literal["squash", "pad", "crop"]
Layout = Literal["overlay", "side-by-side"]
Scale = Literal["running", "frame"]
Baseline = Literal["gradcam"]

VARIANTS: tuple[str, ...] = get_args(Variant)
SCORES: tuple[str, ...] = get_args(Score)
COMBINES: tuple[str, ...] = get_args(Combine)
DTYPES: tuple[str, ...] = get_args(Dtype)
FITS: tuple[str, ...] = get_args(Fit)
LAYOUTS: tuple[str, ...] = get_args(Layout)
SCALES: tuple[str, ...] = get_args(Scale)
BASELINES: tuple[str, ...] = get_args(Baseline)


def spelled(values: Sequence[str]) -> str:
    """Return the values as a user reads them: ``a, b or c``."""
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"
