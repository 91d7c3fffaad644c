"""Score-CAM's maths that needs no model: from activations and masked-pass logits to maps.

The algorithm (Wang et al., 2020; ../shared/reference/scorecam-article.txt):

1. one forward of the input x (N, 3, S, S) gives the target layer's activations A (N, K, h, w)
   and the logits (:class:`BasePass`);
2. every channel A_k is upsampled bilinearly to S x S and min-max normalised,
   ``M_k = (U_k - min U_k) / (max U_k - min U_k + 1e-5)`` (:func:`normalised_masks`);
3. the masked input ``x * M_k`` goes through the model; the softmax probability of the target
   class is the channel's score s_k (:meth:`Weighting.target_scores`);
4. ``map = ReLU(sum_k s_k * M_k)`` (:meth:`Weighting.shard`, :func:`combine_shards`).

Steps 1 and 3 need the model (:mod:`scorecam_stream.scorecam`,
:mod:`scorecam_stream.masked_passes`); everything here does not, so a Ray driver and the
per-stream reuse state (:mod:`scorecam_stream.reuse`) sum maps exactly as the engine does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

from .choices import COMBINES, SCORES, VARIANTS, Combine, Score, Variant, spelled
from .transfer import to_device, to_host

EPS = 1e-5  # the article's term in the normalisation's denominator
GRAD_CAM_MASK_EPS = 1e-8  # pytorch-grad-cam's term in the masks' normalisation
GRAD_CAM_SCALE_EPS = 1e-7  # pytorch-grad-cam's term in the maps' min-max scaling
# What pytorch-grad-cam's ScoreCAM fixes: target logit, softmax across channels, raw activations.
GRAD_CAM_OPTIONS: dict[str, Any] = {"score": "logit", "channel_softmax": True, "combine": "raw"}
ARTICLE_OPTIONS: dict[str, Any] = {
    "score": "softmax",
    "channel_softmax": False,
    "combine": "normalized",
}


def normalised_masks(
    channels: torch.Tensor,
    lows: torch.Tensor,
    spans: torch.Tensor,
    size: torch.Size,
    align_corners: bool = False,
) -> torch.Tensor:
    """Return M_k (B, 1, S, S): each channel (B, h, w) upsampled, minus its min, over its span.

    Upsampled bilinearly as the article does (``align_corners=True``: as pytorch-grad-cam does).
    """
    up = F.interpolate(channels[:, None], size=size, mode="bilinear", align_corners=align_corners)
    return (up - lows[:, None, None, None]) / spans[:, None, None, None]


def upsampled_range(
    acts: torch.Tensor, size: torch.Size, align_corners: bool, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (min, max) (N, K) of every channel of ``acts`` (N, K, h, w) upsampled to ``size``.

    Upsampled ``chunk`` channels at a time, so that only those are held at full size.
    """
    n, k = acts.shape[:2]
    lows = torch.empty(n, k, device=acts.device)
    highs = torch.empty(n, k, device=acts.device)
    for i in range(0, k, chunk):
        up = F.interpolate(
            acts[:, i : i + chunk], size=size, mode="bilinear", align_corners=align_corners
        ).flatten(2)  # (N, chunk, S*S)
        lows[:, i : i + chunk], highs[:, i : i + chunk] = up.amin(dim=2), up.amax(dim=2)
    return lows, highs


@dataclass(frozen=True)
class BasePass:
    """One forward of a batch of frames: what every shard of those frames needs.

    ``activations`` holds the frames' channels in scoring order: all K channels, or with
    ``max_channels`` the selected ones (their ids in ``channels``).
    """

    x: torch.Tensor  # (N, 3, S, S) model input
    logits: torch.Tensor  # (N, C) float32
    activations: torch.Tensor  # (N, Kc, h, w) float32
    channels: torch.Tensor  # (N, Kc) int64 channel ids of `activations`
    lows: torch.Tensor  # (N, Kc) min of each upsampled channel
    highs: torch.Tensor  # (N, Kc) max of each upsampled channel

    @property
    def num_channels(self) -> int:
        """Return Kc, the number of channels a full set of shards covers."""
        return self.activations.shape[1]

    def to(self, device: torch.device | str) -> BasePass:
        """Return this base pass with every tensor on ``device`` (pinned, async copies)."""
        values = [getattr(self, f) for f in self.__dataclass_fields__]
        if torch.device(device).type == "cpu":
            return BasePass(*cast(list[torch.Tensor], to_host(values)))
        return BasePass(*(to_device(v, device) for v in values))


@dataclass(frozen=True)
class ShardResult:
    """The contribution of channels [start, stop) to the maps of N frames and T targets.

    ``partial`` is the weighted sum before ReLU. With ``channel_softmax`` the weights are
    ``exp(s_k - shift)`` and ``norm`` is their sum, so shards combine like a split softmax.
    """

    start: int
    stop: int
    partial: torch.Tensor  # (N, T, S, S) float32
    scores: torch.Tensor | None  # (N, T, stop - start) float32, per-channel scores, if kept
    skipped: torch.Tensor  # (N,) int64, constant channels whose masked pass was skipped
    shift: torch.Tensor | None = None  # (N, T) max score of the shard (channel_softmax only)
    norm: torch.Tensor | None = None  # (N, T) sum of exp(s_k - shift) (channel_softmax only)
    # pytorch-grad-cam variant: ``partial`` is (N, T, h, w) at the layer's resolution, and
    # combine_shards applies ReLU there, min-max scales, upsamples to this (S, S) and rescales.
    size: tuple[int, ...] | None = None

    def to(self, device: torch.device | str) -> ShardResult:
        """Return this shard result with every tensor on ``device`` (pinned, async copies)."""
        move = {f: getattr(self, f) for f in self.__dataclass_fields__}
        names = [n for n, v in move.items() if isinstance(v, torch.Tensor)]
        if torch.device(device).type == "cpu":
            moved = to_host([move[n] for n in names])
        else:
            moved = [to_device(move[n], device) for n in names]
        move.update(zip(names, moved, strict=True))
        return ShardResult(**move)


@dataclass(frozen=True)
class ScoreCAMResult:
    """Score-CAM maps of a batch.

    ``maps`` is (N, S, S), or (N, T, S, S) when several targets per frame were asked for;
    ReLU applied, not rescaled (the pytorch-grad-cam variant: min-max scaled to [0, 1]).
    ``targets`` is (N,) or (N, T); ``probs`` the softmax probability of each target on the
    unmasked input; ``skipped`` (N,) the constant channels whose masked pass was skipped.
    """

    maps: torch.Tensor
    targets: torch.Tensor
    probs: torch.Tensor
    skipped: torch.Tensor


def combine_shards(shards: Sequence[ShardResult]) -> torch.Tensor:
    """Return ReLU(sum of the shards' partials) (N, T, S, S), summed in the order given.

    Shards must cover [0, Kc) exactly once; with channel softmax their exponentials are rescaled
    to a common shift first (exact up to float rounding). Shards of the pytorch-grad-cam
    variant (``size`` set) give that library's maps: min-max scaled to [0, 1].
    """
    if not shards:
        raise ValueError("no shards to combine")
    if shards[0].shift is None:
        total = shards[0].partial.clone()
        for shard in shards[1:]:
            total += shard.partial
    else:
        shifts = [cast(torch.Tensor, s.shift) for s in shards]  # all set, as the first one's
        shift = torch.stack(shifts).amax(dim=0)  # (N, T)
        total = torch.zeros_like(shards[0].partial)
        norm = torch.zeros_like(shift)
        for shard in shards:
            scale = torch.exp(cast(torch.Tensor, shard.shift) - shift)  # (N, T)
            total += scale[..., None, None] * shard.partial
            norm += scale * cast(torch.Tensor, shard.norm)
        total /= norm[..., None, None]
    total.clamp_(min=0)
    if shards[0].size is None:
        return total
    # pytorch-grad-cam: ReLU at the layer's resolution (above), min-max, resize, min-max again.
    up = F.interpolate(_min_max(total), size=shards[0].size, mode="bilinear", align_corners=False)
    return _min_max(up)


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """Return each (h, w) map of ``maps`` (N, T, h, w) scaled as pytorch-grad-cam scales it."""
    low = maps.amin(dim=(2, 3), keepdim=True)
    shifted = maps - low
    return shifted / (shifted.amax(dim=(2, 3), keepdim=True) + GRAD_CAM_SCALE_EPS)


@dataclass(frozen=True)
class Weighting:
    """How masked-pass logits become maps: the engine's options that need no model.

    :class:`ScoreCAM` holds one; so does whoever sums maps away from the model (the per-stream
    reuse state on a Ray driver, :mod:`scorecam_stream.reuse`), so that both give the same maps
    from the same logits. Build it with :meth:`resolve` (a variant's defaults, validated).
    """

    score: Score = "softmax"
    channel_softmax: bool = False
    combine: Combine = "normalized"
    variant: Variant = "article"

    @classmethod
    def resolve(
        cls,
        variant: str = "article",
        score: str | None = None,
        channel_softmax: bool | None = None,
        combine: str | None = None,
    ) -> Weighting:
        """Return the weighting of ``variant``, with the options given (None: the variant's).

        Raises ValueError for a value no variant has, or one that ``variant`` fixes otherwise.
        """
        if variant not in VARIANTS:
            raise ValueError(f"variant must be {spelled(VARIANTS)}, got '{variant}'")
        options = ARTICLE_OPTIONS if variant == "article" else GRAD_CAM_OPTIONS
        given: dict[str, Any] = {
            "score": score,
            "channel_softmax": channel_softmax,
            "combine": combine,
        }
        if variant != "article":
            clash = [f"{k}={v!r}" for k, v in given.items() if v is not None and v != options[k]]
            if clash:
                raise ValueError(f"variant {variant} fixes {options}; got {', '.join(clash)}")
        chosen = {k: options[k] if v is None else v for k, v in given.items()}
        if chosen["score"] not in SCORES:
            raise ValueError(f"score must be {spelled(SCORES)}, got '{chosen['score']}'")
        if chosen["combine"] not in COMBINES:
            raise ValueError(f"combine must be {spelled(COMBINES)}, got '{chosen['combine']}'")
        return cls(
            chosen["score"],
            bool(chosen["channel_softmax"]),
            chosen["combine"],
            cast(Variant, variant),
        )

    @property
    def mask_eps(self) -> float:
        """Return the term in the masks' normalisation (the article's, or pytorch-grad-cam's)."""
        return GRAD_CAM_MASK_EPS if self.variant == "pytorch-grad-cam" else EPS

    @property
    def align_corners(self) -> bool:
        """Return how masks are upsampled (torch.nn.UpsamplingBilinear2d for pytorch-grad-cam)."""
        return self.variant == "pytorch-grad-cam"

    def target_scores(
        self, logits: torch.Tensor, targets: torch.Tensor, base_logits: torch.Tensor
    ) -> torch.Tensor:
        """Return the score (B, T) of each row's targets (B, T) from masked logits (B, C).

        ``base_logits`` (B, C) are the unmasked logits of each row's frame (``logit_delta``).
        """
        if self.score == "softmax":
            return logits.softmax(dim=1).gather(1, targets)
        picked = logits.gather(1, targets)
        if self.score == "logit":
            return picked
        return picked - base_logits.gather(1, targets)

    def shard(
        self,
        scores: torch.Tensor,
        acts: torch.Tensor,
        lows: torch.Tensor,
        highs: torch.Tensor,
        size: torch.Size,
        start: int,
        skipped: torch.Tensor,
        keep_scores: bool = True,
    ) -> ShardResult:
        """Return the shard of channels [start, start + R) with ``scores`` (N, T, R).

        ``acts`` (N, R, h, w) and their upsampled ``lows``/``highs`` (N, R) are the channels';
        ``skipped`` (N, R) bool says whose masked pass was skipped (counted in the result).
        """
        shift = norm = None
        if self.channel_softmax:
            shift = scores.amax(dim=2)  # (N, T)
            weights = torch.exp(scores - shift[..., None])
            norm = weights.sum(dim=2)
        else:
            weights = scores
        return ShardResult(
            start=start,
            stop=start + scores.shape[2],
            partial=self.weighted_sum(weights, acts, lows, highs, size),
            scores=scores if keep_scores else None,
            skipped=skipped.sum(dim=1),
            shift=shift,
            norm=norm,
            size=tuple(size) if self.variant == "pytorch-grad-cam" else None,
        )

    def weighted_sum(
        self,
        weights: torch.Tensor,
        acts: torch.Tensor,
        lows: torch.Tensor,
        highs: torch.Tensor,
        size: torch.Size,
    ) -> torch.Tensor:
        """Return sum_k w_k * V_k (N, T, S, S), V_k = M_k (normalized) or U_k (raw).

        Upsampling is linear and M_k = a_k * U_k + b_k, so the sum is taken at the layer's
        resolution and upsampled once: one interpolation instead of R. The pytorch-grad-cam
        variant returns the sum at the layer's resolution (N, T, h, w), as that library does.
        """
        if self.combine == "normalized":
            scale = 1.0 / (highs - lows + self.mask_eps)  # (N, R)
            # A constant channel's mask is exactly zero: drop it rather than rely on rounding.
            scale = torch.where(highs == lows, torch.zeros_like(scale), scale)
            offset = -lows * scale
        else:
            scale, offset = torch.ones_like(lows), torch.zeros_like(lows)
        low_res = torch.einsum("ntr,nrhw->nthw", weights * scale[:, None], acts)  # (N, T, h, w)
        if self.variant == "pytorch-grad-cam":
            return low_res  # combine="raw": no offset; ReLU and resizing in combine_shards
        up = F.interpolate(low_res, size=size, mode="bilinear", align_corners=False)
        return up + (weights * offset[:, None]).sum(dim=2)[..., None, None]
