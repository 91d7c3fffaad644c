"""Temporal reuse: explain a stream frame after frame, paying for what changed (``--fidelity``).

Consecutive frames are nearly the same, so most channels' masks, and so most of their masked
passes' results, barely move. :class:`StreamState` belongs to one stream (one video, one live
source) and keeps, for every channel, the logits of its latest masked pass (all classes: a new
target class costs no pass) and the masked input's *probe* it was computed on (the normalised
mask times the model input, both at PROBE_GRID x PROBE_GRID). Each frame:

1. the base pass runs as always (exact activations, masks, logits, targets);
2. :meth:`StreamState.plan` picks the channels to recompute: the ``budget`` share of the live
   (non-constant) channels whose probe moved most since their result, times how much they weigh
   in the map (their cached score); plus those never computed and, among those that
   moved, any older than ``max_age`` frames. A channel whose probe did not move at all is
   never recomputed (its pass would give the same logits), so a still video costs no masked
   pass after its first frame and its maps are exact;
3. the worker(s) run only those passes (:meth:`scorecam_stream.ScoreCAM.channel_logits`);
4. :meth:`StreamState.finish` sums the map from the current frame's masks with the fresh
   results and the cached ones (the same :class:`~scorecam_stream.weighting.Weighting` as the
   exact engine).

Keyframes (every 4 frames at first, up to every ``keyframe_interval`` while anything moved;
after a scene cut; and on the next frame when a refresh moved the map by more than the allowed
error) recompute every live channel. Their map is exact, and it measures what reuse would have
given on that frame (the budget's selection over the cache as it was): the Pearson correlation
of the two maps. A controller keeps it at or above ``fidelity``: the budget doubles and
keyframes come twice as often when it falls short; both relax when it is comfortably above.
``fidelity`` 1.0 means no reuse at all: the explainers then run the exact engine untouched.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from .errors import ScoreCamError
from .weighting import BasePass, Weighting, combine_shards

log = logging.getLogger(__name__)

_DEFAULT_INTERVAL = 16  # frames between keyframes at most: a full recompute costs K passes
_FIRST_INTERVAL = 4  # at first: the budget is calibrated soon, then keyframes space out
# Masked inputs are compared at this resolution: fine enough to see a pan move a mask's
# content at any layer (a 2 x 2 or 4 x 4 head layer's own grid is far too coarse for that).
PROBE_GRID = 16
# A new scene: the cosine similarity of the channels' mean activations with the last frame's
# falls below this (consecutive frames of pans and zooms: >= 0.93; a cut: 0.24 in the bench).
_CUT = 0.7


@dataclass(frozen=True)
class ReuseOptions:
    """How a stream reuses masked-pass results; ``fidelity`` 1.0 is the exact engine."""

    fidelity: float = 1.0  # the correlation with the exact map to hold, measured at keyframes
    keyframe_interval: int = _DEFAULT_INTERVAL  # at most this many frames between keyframes
    max_age: int = 2 * _DEFAULT_INTERVAL  # a moved channel's result is recomputed this old
    initial_budget: float = 0.25  # share of the live channels recomputed per frame, at first
    min_budget: float = 1 / 64
    cut: float = _CUT  # cosine similarity with the last frame below which a frame is a cut

    def __post_init__(self) -> None:
        if not (isinstance(self.fidelity, (int, float)) and 0 < self.fidelity <= 1):
            raise ScoreCamError(f"--fidelity must be in (0, 1], got {self.fidelity}")
        if self.keyframe_interval < 1 or self.max_age < 1:
            raise ScoreCamError("keyframe_interval and max_age must be >= 1")
        if not 0 < self.min_budget <= self.initial_budget <= 1:
            raise ScoreCamError("need 0 < min_budget <= initial_budget <= 1")

    @property
    def exact(self) -> bool:
        """Return whether every pass runs on every frame (no state is kept)."""
        return self.fidelity >= 1.0


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
class Plan:
    """The masked passes one frame runs, and why."""

    channels: torch.Tensor  # (R,) int64, ascending: the channels to recompute
    keyframe: bool  # every live channel is recomputed
    probes: torch.Tensor  # (K, 3, G, G) this frame's probes (kept with the fresh results)
    selection: torch.Tensor | None = None  # keyframes: what the budget alone would have picked
    measure: bool = False  # keyframes: compare the reuse map with the exact one


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


def _grid_masks(view: FrameView) -> torch.Tensor:
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
    k = logits.shape[0]
    t = targets.cpu().long()
    scores = weighting.target_scores(logits, t.expand(k, -1), view.logits.expand(k, -1))
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


class StreamState:
    """Per-stream cache of masked-pass results, the channel selection and the budget controller.

    Frames go through :meth:`plan` then :meth:`finish`, one at a time, in stream order.
    """

    def __init__(self, weighting: Weighting, options: ReuseOptions) -> None:
        if options.exact:
            raise ValueError("fidelity 1.0 keeps no state: run the exact engine")
        self.weighting = weighting
        self.options = options
        self.budget = options.initial_budget
        self.interval = min(_FIRST_INTERVAL, options.keyframe_interval)  # frames to a keyframe
        self._logits: torch.Tensor | None = None  # (K, C) latest masked-pass logits
        self._probes: torch.Tensor | None = None  # (K, 3, G, G) probe each result was run on
        self._known: torch.Tensor | None = None  # (K,) bool: a live result is cached
        self._age: torch.Tensor | None = None  # (K,) frames since each result was computed
        self._previous: torch.Tensor | None = None  # (K,) the last frame's mean activations
        self._since_key = 0

    # ------------------------------------------------------------------ per frame

    def plan(self, view: FrameView, targets: torch.Tensor) -> Plan:
        """Return the channels to recompute for ``view`` explaining ``targets`` (T,)."""
        live = view.live
        probes = self._probe(view)
        every = live.nonzero().flatten()
        if self._logits is None or self._probes is None or self._logits.shape[0] != len(live):
            return Plan(every, True, probes)  # the first frame (or a new layer size)
        assert self._known is not None and self._age is not None
        if self._is_cut(view):
            log.debug("scene cut: recomputing every channel")
            return Plan(every, True, probes)
        change = (probes - self._probes).abs().flatten(1).mean(dim=1)  # (K,)
        forced = live & ~self._known
        moved = live & self._known & (change > 0)
        if not bool(forced.any() | moved.any()):
            return Plan(every[:0], False, probes)  # nothing moved: every result still holds
        selection = self._select(view, targets, live, change, forced, moved)
        if self._since_key + 1 >= self.interval:
            return Plan(every, True, probes, selection=selection, measure=True)
        return Plan(selection, False, probes)

    def finish(
        self, view: FrameView, plan: Plan, logits: torch.Tensor, targets: torch.Tensor
    ) -> Outcome:
        """Return the frame's maps from ``logits`` (R, C) of ``plan.channels`` and the cache."""
        live = view.live
        k = len(live)
        channels = plan.channels.cpu()
        logits = logits.float().cpu()
        cached = self._logits if self._logits is not None else torch.empty(k, logits.shape[1])
        current = cached.clone()
        current[~live] = view.zero_logits  # exact: a constant channel's input is the zero image
        current[channels] = logits
        maps = maps_of(self.weighting, view, current, targets)
        fidelity = None
        if plan.measure and plan.selection is not None:
            reuse = cached.clone()
            reuse[~live] = view.zero_logits
            reuse[plan.selection] = current[plan.selection]
            fidelity = correlation(maps[0], maps_of(self.weighting, view, reuse, targets)[0])
            self._control(fidelity)
        elif not plan.keyframe and channels.numel() and self._logits is not None:
            # A free early warning: if the channels just recomputed moved the map by more than
            # the allowed error, the reused ones have likely moved too: measure next frame.
            stale = cached.clone()
            stale[~live] = view.zero_logits
            drift = correlation(maps[0], maps_of(self.weighting, view, stale, targets)[0])
            if drift < self.options.fidelity:
                self._since_key = self.interval
        self._store(view, plan, current, channels)
        outcome = Outcome(
            maps=maps,
            passes=int(channels.numel()),
            reused=int(live.sum()) - int(channels.numel()),
            keyframe=plan.keyframe,
            fidelity=fidelity,
        )
        return outcome

    # ------------------------------------------------------------------ internals

    def _probe(self, view: FrameView) -> torch.Tensor:
        """Return each channel's probe (K, 3, G, G): its normalised mask times the input."""
        masks = _grid_masks(view)  # (K, G, G)
        return masks[:, None] * view.pooled[None]

    def _is_cut(self, view: FrameView) -> bool:
        """Return whether ``view`` starts a new scene: its channels' means turned away."""
        previous = self._previous
        assert previous is not None
        similarity = F.cosine_similarity(view.activations.flatten(1).mean(dim=1), previous, dim=0)
        return float(similarity) < self.options.cut

    def _select(
        self,
        view: FrameView,
        targets: torch.Tensor,
        live: torch.Tensor,
        change: torch.Tensor,
        forced: torch.Tensor,
        moved: torch.Tensor,
    ) -> torch.Tensor:
        """Return the channels (R,) the budget recomputes: forced ones, then by priority."""
        assert self._logits is not None and self._age is not None
        k = len(live)
        t = targets.cpu().long()
        scores = self.weighting.target_scores(
            self._logits, t.expand(k, -1), view.logits.expand(k, -1)
        )  # (K, T) cached scores, read for the current targets
        if self.weighting.score != "softmax":  # logits: what counts is the distance from typical
            scores = scores - scores.mean(dim=0)
        weight = scores.abs().amax(dim=1)
        # The change of its masked input, times what the channel weighs in the map.
        priority = torch.where(moved, change * (weight + 1e-12), torch.zeros_like(change))
        must = forced | (moved & (self._age >= self.options.max_age))
        budget = math.ceil(self.budget * int(live.sum()))
        room = max(0, min(budget - int(must.sum()), int((moved & ~must).sum())))
        chosen = must.clone()
        if room:
            candidates = torch.where(must, torch.zeros_like(priority), priority)
            chosen[candidates.topk(room).indices] = True
        return chosen.nonzero().flatten()

    def _control(self, fidelity: float) -> None:
        """Adjust the budget, and how often it is measured, from a keyframe's correlation.

        Short of the target: twice the budget, keyframes twice as often. Comfortably above
        (less than half the allowed error): a quarter fewer passes, keyframes further apart.
        """
        target = self.options.fidelity
        before = self.budget
        if fidelity < target:
            self.budget = min(1.0, self.budget * 2)
            self.interval = max(2, self.interval // 2)
        elif 1 - fidelity < 0.5 * (1 - target):
            self.budget = max(self.options.min_budget, self.budget * 0.75)
            self.interval = min(self.options.keyframe_interval, self.interval * 2)
        log.debug(
            "keyframe fidelity %.5f: budget %.4f -> %.4f, keyframes every %d frames",
            fidelity,
            before,
            self.budget,
            self.interval,
        )

    def _store(
        self, view: FrameView, plan: Plan, logits: torch.Tensor, channels: torch.Tensor
    ) -> None:
        """Keep this frame's results: fresh ones with their probes, the rest a frame older."""
        probes, keyframe = plan.probes, plan.keyframe
        live = view.live
        if self._probes is None or self._probes.shape != probes.shape or keyframe:
            self._probes = probes.clone()
            self._known = live.clone()
            self._age = torch.zeros(len(live), dtype=torch.int64)
        else:
            assert self._known is not None and self._age is not None
            self._age += 1
            self._probes[channels] = probes[channels]
            self._age[channels] = 0
            self._known[channels] = True
            self._known &= live  # a channel that went constant has no live result to keep
        self._logits = logits
        self._previous = view.activations.flatten(1).mean(dim=1)
        self._since_key = 0 if keyframe else max(self._since_key, 0) + 1
