"""What temporal reuse needs of a frame, and what it tells: a frame's view, maps from logits, costs.

:class:`FrameView` is what a frame's base pass gives the per-stream reuse state
(:mod:`scorecam_stream.reuse`), on the CPU, so that it can travel to a Ray driver;
:func:`maps_of` sums a frame's maps from every channel's masked logits as the exact engine
would; :class:`Outcome` and :class:`ReuseTally` say what the frames cost. Pure torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from .errors import ScoreCamError
from .weighting import BasePass, Weighting, combine_shards

# Masked inputs are compared at this resolution: fine enough to see a pan move a mask's
# content at any layer (a 2 x 2 or 4 x 4 head layer's own grid is far too coarse for that).
PROBE_GRID = 16


@dataclass(frozen=True)
class FrameView:
    """What the reuse state needs of one frame's base pass, on the CPU (it travels to a driver).

    All channels of the target layer (not ``--max-channels``' selection).
    """

    activations: torch.Tensor  # (K, h, w) float32
    lows: torch.Tensor  # (K,) min of each upsampled channel
    highs: torch.Tensor  # (K,) max of each upsampled channel
    logits: torch.Tensor  # (C,) unmasked logits
    zero_logits: torch.Tensor  # (C,) logits of the all-zero input (every constant channel's)
    pooled: torch.Tensor  # (3, G, G) the model input, averaged over the probe grid
    size: tuple[int, int]  # (S, S) the model input's size

    @classmethod
    def of(cls, base: BasePass, zero_logits: torch.Tensor) -> FrameView:
        """Return the view of frame 0 of ``base`` (every channel), on the CPU."""
        acts = base.activations[0]
        if acts.shape[0] != base.channels.shape[1] or not bool(
            (base.channels[0] == torch.arange(acts.shape[0], device=acts.device)).all()
        ):
            raise ScoreCamError("--fidelity below 1 needs every channel: drop --max-channels")
        pooled = F.adaptive_avg_pool2d(base.x[:1].float(), PROBE_GRID)[0]
        return cls(
            activations=acts.cpu(),
            lows=base.lows[0].cpu(),
            highs=base.highs[0].cpu(),
            logits=base.logits[0].cpu(),
            zero_logits=zero_logits.float().cpu(),
            pooled=pooled.cpu(),
            size=(int(base.x.shape[-2]), int(base.x.shape[-1])),
        )

    @property
    def live(self) -> torch.Tensor:
        """Return (K,) bool: the channels whose mask is not all zero (their pass is needed)."""
        return self.highs != self.lows


@dataclass(frozen=True)
class Outcome:
    """One frame's maps and what they cost."""

    maps: torch.Tensor  # (T, S, S) float32, ReLU applied
    passes: int  # masked passes run for this frame
    reused: int  # live channels whose cached result was used
    keyframe: bool
    fidelity: float | None  # keyframes: correlation of the reuse map with the exact map


class Costed(Protocol):
    """What one explained frame cost: an :class:`Outcome`, or a FrameResult that carries it."""

    @property
    def passes(self) -> int: ...
    @property
    def reused(self) -> int: ...
    @property
    def keyframe(self) -> bool: ...
    @property
    def fidelity(self) -> float | None: ...


@dataclass
class ReuseTally:
    """What the explained frames of a stream cost, for the run's summary."""

    frames: int = 0
    passes: int = 0
    exact_passes: int = 0  # what the exact engine would have run (live channels)
    keyframes: int = 0
    fidelities: list[float] = field(default_factory=list)

    def add(self, outcome: Costed) -> None:
        """Count one explained frame."""
        self.frames += 1
        self.passes += outcome.passes
        self.exact_passes += outcome.passes + outcome.reused
        self.keyframes += outcome.keyframe
        if outcome.fidelity is not None:
            self.fidelities.append(outcome.fidelity)

    def summary(self) -> dict[str, float | int | None]:
        """Return the summary fields: passes per frame, their share of exact, fidelity."""
        fid = self.fidelities
        return {
            "passes_per_frame": round(self.passes / self.frames, 3) if self.frames else None,
            "passes_share": round(self.passes / self.exact_passes, 4)
            if self.exact_passes
            else None,
            "keyframes": self.keyframes,
            "fidelity_mean": round(sum(fid) / len(fid), 5) if fid else None,
            "fidelity_min": round(min(fid), 5) if fid else None,
        }


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Return the Pearson correlation of two maps (1.0 for equal flat maps, 0.0 if one is)."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    if den == 0.0:
        return 1.0 if bool(torch.equal(a, b)) else 0.0
    return float((a @ b) / den)


def grid_masks(view: FrameView) -> torch.Tensor:
    """Return every channel's normalised mask on the probe grid (K, G, G), constant ones 0."""
    grid = view.pooled.shape[-2:]
    up = F.interpolate(view.activations[None], size=grid, mode="bilinear", align_corners=False)[0]
    span = (view.highs - view.lows)[:, None, None]
    masks = ((up - view.lows[:, None, None]) / span.clamp_min(1e-12)).clamp(0, 1)
    return torch.where(span > 0, masks, torch.zeros_like(masks))


def maps_of(
    weighting: Weighting, view: FrameView, logits: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Return the maps (T, S, S) of a frame from every channel's masked logits (K, C).

    The exact engine's maps when ``logits`` are this frame's own passes (constant channels:
    the zero image's logits).
    """
    return maps_of_scores(weighting, view, scores_of(weighting, view, logits, targets))


def scores_of(
    weighting: Weighting, view: FrameView, logits: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Return every channel's scores (K, T) for ``targets`` (T,) from its masked logits (K, C)."""
    k = logits.shape[0]
    t = targets.cpu().long()
    return weighting.target_scores(logits, t.expand(k, -1), view.logits.expand(k, -1))


def maps_of_scores(weighting: Weighting, view: FrameView, scores: torch.Tensor) -> torch.Tensor:
    """Return the maps (T, S, S) of a frame from every channel's scores (K, T)."""
    shard = weighting.shard(
        scores.T[None],  # (1, T, K)
        view.activations[None],
        view.lows[None],
        view.highs[None],
        torch.Size(view.size),
        0,
        ~view.live[None],
        keep_scores=False,
    )
    return combine_shards([shard])[0]
