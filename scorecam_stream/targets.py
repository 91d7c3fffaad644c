"""Which classes a map explains: one home for parsing, resolving and checking targets.

``--target`` is parsed here (:func:`parse`: top1, dominant, a class id or a class name); the
engine's rule for a frame's targets (fixed classes as given, else the top-k) is :func:`resolve`;
the workers check a run's classes against the model's with :func:`for_frame`; ``dominant``
(the most frequent top-1 class) is counted by :class:`TopCounts`, over a whole file or, live,
over the frames seen so far.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .errors import ScoreCamError

POLICIES = ("top1", "dominant")  # --target values that are not one class
Targets = int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | None


def resolve(
    logits: torch.Tensor, targets: Targets, topk: int | None = None
) -> tuple[torch.Tensor, bool]:
    """Return (targets (N, T) int64 on the logits' device, whether T was implicit).

    ``logits`` (N, C); ``targets``: None (each row's top-``topk``, top-1 by default), one class
    for every row, one class per row (N,), or T classes per row (N, T). Raises ValueError when
    the shapes or classes do not fit.
    """
    n, classes = logits.shape
    if targets is None:
        k = topk or 1
        if not 1 <= k <= classes:
            raise ValueError(f"topk must be in [1, {classes}], got {k}")
        return logits.topk(k, dim=1).indices, topk is None
    t = torch.as_tensor(targets, dtype=torch.int64, device=logits.device)
    squeeze = t.dim() < 2
    if t.dim() == 0:
        t = t.expand(n)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] != n:
        raise ValueError(f"targets must be (N,) or (N, T) with N={n}, got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= classes):
        raise ValueError(f"target classes must be in [0, {classes}), got {t.tolist()}")
    return t, squeeze


def for_frame(logits: torch.Tensor, fixed: Sequence[int] | None, topk: int) -> torch.Tensor:
    """Return the classes (T,) to explain for a frame with ``logits`` (C,).

    Raises ScoreCamError (a user's mistake: the run's options do not fit the model) when a
    fixed class or ``topk`` is not within the model's classes.
    """
    classes = logits.shape[0]
    if fixed is None and not 1 <= topk <= classes:
        raise ScoreCamError(f"--topk {topk} is more than the model's {classes} classes")
    bad = [t for t in fixed or () if not 0 <= t < classes]
    if bad:
        raise ScoreCamError(f"target class {bad[0]} is not in [0, {classes})")
    wanted = None if fixed is None else [list(fixed)]
    return resolve(logits[None], wanted, topk)[0][0]


def probabilities(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return the softmax probability (T,) of each target class, from logits (C,)."""
    return logits.float().softmax(0)[targets.to(logits.device)]


def parse(wanted: str, names: tuple[str, ...]) -> tuple[str, tuple[int, ...] | None]:
    """Return (description, (class,)) for a class id or name; (wanted, None) for top1/dominant.

    Raises ScoreCamError for an id out of range or a name the model does not have.
    """
    if wanted in POLICIES:
        return wanted, None
    if wanted.lstrip("-").isdigit():
        index = int(wanted)
        classes = len(names) if names else None
        if index < 0 or (classes is not None and index >= classes):
            raise ScoreCamError(
                f"--target {index} is not a class id of the model (0..{(classes or 1) - 1})"
            )
        return class_name(names, index), (index,)
    lowered = [n.lower() for n in names]
    if wanted.lower() in lowered:
        index = lowered.index(wanted.lower())
        return names[index], (index,)
    close = [n for n in names if wanted.lower() in n.lower()][:4]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ScoreCamError(
        f"--target '{wanted}' is not top1, dominant, a class id or a class name{hint}"
    )


def class_name(names: tuple[str, ...], index: int) -> str:
    """Return the name of class ``index`` (the id itself when the model has no names)."""
    return names[index] if 0 <= index < len(names) else str(index)


class TopCounts:
    """How often each class was the top-1 class: ``--target dominant``'s count."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, np.int64)

    def add(self, logits: torch.Tensor) -> None:
        """Count the top-1 class of each row of ``logits`` (N, C)."""
        tops = logits.argmax(1).cpu().numpy()
        found = np.bincount(tops, minlength=len(self.counts))
        self.counts = np.pad(self.counts, (0, len(found) - len(self.counts))) + found

    @property
    def frames(self) -> int:
        """Return how many rows were counted."""
        return int(self.counts.sum())

    def dominant(self) -> int:
        """Return the most frequent top-1 class (the lowest id on a tie)."""
        if not self.frames:
            raise ValueError("no frames counted")
        return int(np.argmax(self.counts))
