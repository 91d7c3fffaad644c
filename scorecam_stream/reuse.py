"""Temporal reuse: explain a stream frame after frame, paying for what changed (``--fidelity``).

Consecutive frames are nearly the same, so most channels' masks, and so most of their masked
passes' results, barely move. :class:`StreamState` belongs to one stream (one video, one live
source) and keeps, for every channel, the logits of its latest masked pass (all classes: a new
target class costs no pass) and the masked input's *probe* it was computed on (the normalised
mask times the model input, both at PROBE_GRID x PROBE_GRID). Each frame:

1. the base pass runs as always (exact activations, masks, logits, targets);
2. :meth:`StreamState.plan` ranks the channels whose probe moved since their result: those
   never computed and, among those that moved, any older than ``max_age`` frames first; then,
   turn by turn, by that change times how much they weigh in the map (their cached score) and
   by that change times how likely their score is to switch. A channel whose probe
   did not move at all is never recomputed (its pass would give the same logits), so a still
   video costs no masked pass after its first frame and its maps are exact;
3. the worker(s) recompute the plan's channels in rounds of ``chunk`` of the live channels, in
   that order (:meth:`scorecam_stream.ScoreCAM.channel_logits`); after each round
   :meth:`StreamState.absorb` sums the map again and stops once a round moved it by less than
   the tolerance (1 - its correlation with the map before the round), after ``min_rounds``.
   How much a frame costs thus follows how much it changed, frame by frame;
4. :meth:`StreamState.finish` returns the map of the current frame's masks with the fresh
   results and the cached ones (the same :class:`~scorecam_stream.weighting.Weighting` as the
   exact engine).

Keyframes (every 4 frames at first, up to every ``keyframe_interval``, never closer than 8
frames once started; and after a scene cut) recompute every live channel at once, as the exact
engine does, so their map is exact and takes no longer. A keyframe due to measure then replays
the rounds the frame would have run, on the fresh results of the same channels, so it measures
what reuse alone gave on that frame: the Pearson correlation of the two maps. A controller
keeps it at or above ``fidelity``: the
tolerance halves and keyframes come twice as often when it falls short; both relax when it is
comfortably above. ``fidelity`` 1.0 means no reuse at all: the explainers then run the exact
engine untouched.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ScoreCamError
from .reuse_view import (
    PROBE_GRID,
    Costed,
    FrameView,
    Outcome,
    ReuseTally,
    correlation,
    grid_masks,
    maps_of,
    scores_of,
)
from .weighting import Weighting

# What the explainers, the bench and the tests take from here, with the state itself.
__all__ = [
    "PROBE_GRID",
    "Costed",
    "FrameView",
    "Outcome",
    "Plan",
    "ReuseOptions",
    "ReuseTally",
    "StreamState",
    "correlation",
    "maps_of",
]

log = logging.getLogger(__name__)

_DEFAULT_INTERVAL = 16  # frames between keyframes at most: a full recompute costs K passes
_FIRST_INTERVAL = 4  # at first: the tolerance is calibrated soon, then keyframes space out
# A miss brings keyframes closer, never closer than this: a keyframe costs every pass, and the
# tolerance (halved on a miss) is what holds the fidelity (measured on the bench: a floor of 2
# spent more than half of all passes on keyframes for no better maps).
_MIN_INTERVAL = 8
# A new scene: the cosine similarity of the channels' mean activations with the last frame's
# falls below this (consecutive frames of pans and zooms: >= 0.93; a cut: 0.24 in the bench).
_CUT = 0.7
# How far (in log-odds) a moved channel's target score is expected to swing: its chance to
# switch is sigmoid(d + _SWITCH) - sigmoid(d - _SWITCH) for a cached log-odds d (bench: 2).
_SWITCH = 2.0


@dataclass(frozen=True)
class ReuseOptions:
    """How a stream reuses masked-pass results; ``fidelity`` 1.0 is the exact engine."""

    fidelity: float = 1.0  # the correlation with the exact map to hold, measured at keyframes
    keyframe_interval: int = _DEFAULT_INTERVAL  # at most this many frames between keyframes
    max_age: int = 2 * _DEFAULT_INTERVAL  # a moved channel's result is recomputed this old
    chunk: float = 1 / 16  # share of the live channels one round recomputes
    min_rounds: int = 2  # rounds a frame that moved runs at least (fewer if fewer moved)
    # A round that moves the map less than this ends the frame (None: a quarter of 1 - F).
    tolerance: float | None = None
    cut: float = _CUT  # cosine similarity with the last frame below which a frame is a cut

    def __post_init__(self) -> None:
        if not (isinstance(self.fidelity, (int, float)) and 0 < self.fidelity <= 1):
            raise ScoreCamError(f"--fidelity must be in (0, 1], got {self.fidelity}")
        if self.keyframe_interval < 1 or self.max_age < 1:
            raise ScoreCamError("keyframe_interval and max_age must be >= 1")
        if not 0 < self.chunk <= 1 or self.min_rounds < 1:
            raise ScoreCamError("need 0 < chunk <= 1 and min_rounds >= 1")
        if self.tolerance is not None and not 0 < self.tolerance <= 1:
            raise ScoreCamError("need 0 < tolerance <= 1")

    @property
    def exact(self) -> bool:
        """Return whether every pass runs on every frame (no state is kept)."""
        return self.fidelity >= 1.0

    @property
    def first_tolerance(self) -> float:
        """Return the stop rule's tolerance before any keyframe has measured the fidelity."""
        return self.tolerance if self.tolerance is not None else (1 - self.fidelity) / 4


@dataclass(eq=False)
class Plan:
    """One frame in progress: the masked passes to run next, and what the frame has so far.

    :meth:`StreamState.plan` makes it, :meth:`StreamState.absorb` takes each round's logits
    and sets the next round's ``channels`` (empty: the frame is done),
    :meth:`StreamState.finish` returns its :class:`Outcome`.
    """

    view: FrameView
    targets: torch.Tensor  # (T,)
    channels: torch.Tensor  # (R,) int64: the channels to recompute now (empty: done)
    keyframe: bool  # every live channel is recomputed, in one round
    probes: torch.Tensor  # (K, 3, G, G) this frame's probes (kept with the fresh results)
    logits: torch.Tensor  # (K, C) the frame's logits so far: cached, fresh ones written in
    fresh: torch.Tensor  # (K,) bool: recomputed for this frame
    order: torch.Tensor  # (M,) the channels that moved, most urgent first
    # A due keyframe's rounds, run as the frame would have run them (replayed by
    # :meth:`StreamState.finish` on the keyframe's fresh results), to measure their map.
    rounds_plan: Plan | None = None
    rounds: int = 0  # rounds of the ranking run
    asked: int = 0  # how many times :meth:`StreamState.absorb` has taken logits
    done: int = 0  # how far down ``order`` the rounds have gone
    maps: torch.Tensor | None = None  # (T, S, S) the map after the last round


class StreamState:
    """Per-stream cache of masked-pass results, the channel ranking and the controller.

    Frames go through :meth:`plan`, :meth:`absorb` (once per round of passes) and
    :meth:`finish`, one frame at a time, in stream order.
    """

    def __init__(self, weighting: Weighting, options: ReuseOptions) -> None:
        if options.exact:
            raise ValueError("fidelity 1.0 keeps no state: run the exact engine")
        self.weighting = weighting
        self.options = options
        self.tolerance = options.first_tolerance
        self.interval = min(_FIRST_INTERVAL, options.keyframe_interval)  # frames to a keyframe
        self._logits: torch.Tensor | None = None  # (K, C) latest masked-pass logits
        self._probes: torch.Tensor | None = None  # (K, 3, G, G) probe each result was run on
        self._known: torch.Tensor | None = None  # (K,) bool: a live result is cached
        self._age: torch.Tensor | None = None  # (K,) frames since each result was computed
        self._previous: torch.Tensor | None = None  # (K,) the last frame's mean activations
        self._since_key = 0

    # ------------------------------------------------------------------ per frame

    def plan(self, view: FrameView, targets: torch.Tensor) -> Plan:
        """Return the frame's plan for ``view`` explaining ``targets`` (T,): its first round."""
        live = view.live
        k = len(live)
        probes = self._probe(view)
        every = live.nonzero().flatten()
        cached = self._logits
        if cached is None or self._probes is None or cached.shape[0] != k:
            logits = view.zero_logits.expand(k, -1).clone()
            return self._keyframe(view, targets, probes, logits)  # the first frame (or new K)
        assert self._known is not None and self._age is not None
        logits = cached.clone()
        logits[~live] = view.zero_logits  # exact: a constant channel's input is the zero image
        if self._is_cut(view):
            log.debug("scene cut: recomputing every channel")
            return self._keyframe(view, targets, probes, logits)
        change = (probes - self._probes).abs().flatten(1).mean(dim=1)  # (K,)
        must = live & ~self._known
        moved = live & self._known & (change > 0)
        must |= moved & (self._age >= self.options.max_age)
        order = self._rank(view, targets, change, must, moved | must)
        plan = Plan(
            view,
            targets,
            every[:0],
            False,
            probes,
            logits,
            torch.zeros(k, dtype=torch.bool),
            order,
            maps=maps_of(self.weighting, view, logits, targets),
        )
        # The first round takes every channel that must be recomputed, and at least a chunk.
        self._next_round(plan, max(self._chunk(live), int(must.sum())))
        if self._since_key + 1 >= self.interval and order.numel() > 0:
            # A keyframe due to measure: every pass now, the rounds replayed in finish().
            keyframe = self._keyframe(view, targets, probes, logits.clone())
            keyframe.rounds_plan = plan
            return keyframe
        return plan

    def absorb(self, plan: Plan, logits: torch.Tensor) -> None:
        """Write a round's ``logits`` (R, C) of ``plan.channels`` in; set the next round's."""
        channels = plan.channels.cpu()
        plan.asked += 1
        plan.logits[channels] = logits.float().cpu()
        plan.fresh[channels] = True
        plan.channels = channels[:0]
        if plan.keyframe:
            return  # every live channel is in
        plan.rounds += 1
        before = plan.maps
        assert before is not None
        plan.maps = maps_of(self.weighting, plan.view, plan.logits, plan.targets)
        settled = (
            plan.rounds >= self.options.min_rounds
            and 1 - correlation(before[0], plan.maps[0]) < self.tolerance
        )
        if not settled:
            self._next_round(plan, self._chunk(plan.view.live))

    def finish(self, plan: Plan) -> Outcome:
        """Return the frame's maps and costs, and keep its fresh results for the next frames."""
        view = plan.view
        live = view.live
        maps = plan.maps  # the rounds' map, summed from every logit the frame has
        if plan.keyframe or maps is None:  # every pass is in: sum them
            maps = maps_of(self.weighting, view, plan.logits, plan.targets)
        fidelity = None
        rounds = plan.rounds_plan
        if rounds is not None:
            # The rounds take the keyframe's results of the channels they ask for: the same
            # masked inputs, so the same logits they would have got running them.
            while rounds.channels.numel():
                self.absorb(rounds, plan.logits[rounds.channels])
            assert rounds.maps is not None
            fidelity = correlation(maps[0], rounds.maps[0])
            self._control(fidelity)
        self._store(plan)
        passes = int(plan.fresh.sum())
        return Outcome(
            maps=maps,
            passes=passes,
            reused=int(live.sum()) - passes,
            keyframe=plan.keyframe,
            fidelity=fidelity,
        )

    # ------------------------------------------------------------------ internals

    def _keyframe(
        self, view: FrameView, targets: torch.Tensor, probes: torch.Tensor, logits: torch.Tensor
    ) -> Plan:
        """Return a plan that recomputes every live channel at once (no rounds of its own)."""
        every = view.live.nonzero().flatten()
        fresh = torch.zeros(len(view.live), dtype=torch.bool)
        return Plan(view, targets, every, True, probes, logits, fresh, every[:0])

    def _chunk(self, live: torch.Tensor) -> int:
        """Return how many channels one round recomputes."""
        return max(1, math.ceil(self.options.chunk * int(live.sum())))

    def _next_round(self, plan: Plan, count: int) -> None:
        """Set ``plan.channels`` to the next ``count`` of its order (none left: empty)."""
        take = plan.order[plan.done : plan.done + count]
        plan.done += int(take.numel())
        plan.channels = take.sort().values

    def _probe(self, view: FrameView) -> torch.Tensor:
        """Return each channel's probe (K, 3, G, G): its normalised mask times the input."""
        masks = grid_masks(view)  # (K, G, G)
        return masks[:, None] * view.pooled[None]

    def _is_cut(self, view: FrameView) -> bool:
        """Return whether ``view`` starts a new scene: its channels' means turned away."""
        previous = self._previous
        assert previous is not None
        similarity = F.cosine_similarity(view.activations.flatten(1).mean(dim=1), previous, dim=0)
        return float(similarity) < self.options.cut

    def _rank(
        self,
        view: FrameView,
        targets: torch.Tensor,
        change: torch.Tensor,
        must: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        """Return the ``candidates`` (M,) most urgent first: ``must`` ones, then two rankings.

        Turn by turn, the next channel of each ranking: by change times what the channel
        weighs in the map (its cached score), and by change times how likely its score is to
        switch (a cached softmax score near neither 0 nor 1: the masked input sits near a
        class boundary). The first alone misses the channels whose score was ~0 and jumps to
        ~1, which is where the worst frames' error was (measured on the bench); mixing both
        into every round lets the stop rule see them move.
        """
        assert self._logits is not None
        k = len(change)
        # (K, T) cached scores, read for the current targets
        scores = scores_of(self.weighting, view, self._logits, targets)
        if self.weighting.score == "softmax":
            odds = scores.clamp(1e-7, 1 - 1e-7).logit()
            switch = (torch.sigmoid(odds + _SWITCH) - torch.sigmoid(odds - _SWITCH)).amax(dim=1)
        else:  # logits: what counts is the distance from typical; no boundary to read
            scores = scores - scores.mean(dim=0)
            switch = torch.ones(k)
        weighs = change * (scores.abs().amax(dim=1) + 1e-12)
        index = candidates.nonzero().flatten()
        first = torch.zeros(k, dtype=torch.int64)
        for turn, priority in enumerate((weighs, change * switch)):
            # Stable: equal priorities keep channel order, so every run ranks alike.
            ranked = index[priority[index].argsort(descending=True, stable=True)]
            place = 2 * torch.arange(len(ranked)) + turn  # a channel's turn in this ranking
            first[ranked] = place if turn == 0 else torch.minimum(first[ranked], place)
        first[must] = -1  # before every ranked channel
        return index[first[index].argsort(stable=True)]

    def _control(self, fidelity: float) -> None:
        """Adjust the tolerance, and how often it is measured, from a keyframe's correlation.

        Short of the target: half the tolerance, keyframes twice as often (not closer than
        _MIN_INTERVAL). Comfortably above (less than half the allowed error): 1.5 times the
        tolerance (at most the allowed error), keyframes further apart.
        """
        target = self.options.fidelity
        before = self.tolerance
        if fidelity < target:
            self.tolerance = self.tolerance / 2
            floor = min(_MIN_INTERVAL, self.options.keyframe_interval)
            self.interval = max(floor, self.interval // 2)
        elif 1 - fidelity < 0.5 * (1 - target):
            self.tolerance = min(1 - target, self.tolerance * 1.5)
            self.interval = min(self.options.keyframe_interval, self.interval * 2)
        log.debug(
            "keyframe fidelity %.5f: tolerance %.5f -> %.5f, keyframes every %d frames",
            fidelity,
            before,
            self.tolerance,
            self.interval,
        )

    def _store(self, plan: Plan) -> None:
        """Keep this frame's results: fresh ones with their probes, the rest a frame older."""
        view, probes, fresh = plan.view, plan.probes, plan.fresh
        live = view.live
        if self._probes is None or self._probes.shape != probes.shape or plan.keyframe:
            self._probes = probes.clone()
            self._known = live.clone()
            self._age = torch.zeros(len(live), dtype=torch.int64)
        else:
            assert self._known is not None and self._age is not None
            self._age += 1
            self._probes[fresh] = probes[fresh]
            self._age[fresh] = 0
            self._known |= fresh
            self._known &= live  # a channel that went constant has no live result to keep
        self._logits = plan.logits
        self._previous = view.activations.flatten(1).mean(dim=1)
        self._since_key = 0 if plan.keyframe else self._since_key + 1
