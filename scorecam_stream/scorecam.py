"""Score-CAM maths: pure torch, no I/O, no Ray.

The algorithm (Wang et al., 2020; ../shared/reference/scorecam-article.txt):

1. one forward of the input x (N, 3, S, S) gives the target layer's activations A (N, K, h, w)
   and the logits;
2. every channel A_k is upsampled bilinearly to S x S and min-max normalised,
   ``M_k = (U_k - min U_k) / (max U_k - min U_k + 1e-5)``;
3. the masked input ``x * M_k`` goes through the model; the softmax probability of the target
   class is the channel's score s_k;
4. ``map = ReLU(sum_k s_k * M_k)``.

:class:`ScoreCAM` runs this batched (masked passes of several channels and frames per forward)
and by channel range (:meth:`ScoreCAM.shard`), so that the passes of one frame can be split over
many workers and summed back with :func:`combine_shards`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from .model_state import forward_hook, model_device, model_state
from .transfer import to_device, to_host

log = logging.getLogger(__name__)

Score = Literal["softmax", "logit", "logit_delta"]
Combine = Literal["normalized", "raw"]
Variant = Literal["article", "pytorch-grad-cam"]
# (x (N, 3, S, S), each row's frame (B,), channel (B, h, w), min (B,), span (B,)) -> logits (B, C)
MaskedLogits = Callable[..., torch.Tensor]
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
# With fixed-shape chunks, the batch sizes a forward may have: batch_size, /2, /4. A few shapes
# compile a few times; one shape would pad a shard of 129 passes at batch 256 to 256.
FIXED_SHAPES = 3

_DTYPES = {
    "fp32": None,
    "float32": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Return the autocast dtype for a name ('fp32' -> None, 'bf16', 'fp16')."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype == torch.float32 else dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype '{dtype}': use fp32, bf16 or fp16")
    return _DTYPES[dtype]


def chunk_plan(passes: int, batch_size: int, fixed: bool) -> list[tuple[int, int]]:
    """Return (rows, padded rows) of each chunk of ``passes`` masked inputs, in order.

    ``fixed=False``: chunks of ``batch_size``, the last one shorter, no padding. ``fixed=True``:
    every chunk has one of :data:`FIXED_SHAPES` sizes (``batch_size``, its half, its quarter), so
    a compiled model sees only those shapes (CUDA graphs replay them); the largest shape that
    fits is taken each time and only the last chunk is padded, by less than the smallest shape.
    """
    if passes < 0 or batch_size < 1:
        raise ValueError(f"need passes >= 0 and batch_size >= 1, got {passes}, {batch_size}")
    if not fixed:
        return [(min(batch_size, passes - i),) * 2 for i in range(0, passes, batch_size)]
    shapes = sorted({max(1, batch_size >> j) for j in range(FIXED_SHAPES)}, reverse=True)
    plan = []
    left = passes
    while left > 0:
        fit = next((s for s in shapes if s <= left), None)
        if fit is None:  # fewer rows left than the smallest shape: pad them to it
            plan.append((left, shapes[-1]))
            break
        plan.append((fit, fit))
        left -= fit
    return plan


def _normalised_masks(
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
        if variant not in ("article", "pytorch-grad-cam"):
            raise ValueError(f"variant must be article or pytorch-grad-cam, got '{variant}'")
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
        if chosen["score"] not in ("softmax", "logit", "logit_delta"):
            raise ValueError(
                f"score must be softmax, logit or logit_delta, got '{chosen['score']}'"
            )
        if chosen["combine"] not in ("normalized", "raw"):
            raise ValueError(f"combine must be normalized or raw, got '{chosen['combine']}'")
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


class ScoreCAM:
    """Score-CAM for one model and one target layer.

    ``engine(x, targets)`` returns a :class:`ScoreCAMResult`; ``engine.base(x)`` and
    ``engine.shard(base, targets, start, stop)`` give the same maps by channel range.

    Options (typed, fixed at construction):

    - ``batch_size``: masked inputs per forward.
    - ``variant``: ``article`` (the default: the article, with the three options below) or
      ``pytorch-grad-cam``: that library's ScoreCAM step for step (masks upsampled with
      ``align_corners=True`` and normalised with 1e-8; target logit; softmax across channels;
      raw activations summed at the layer's resolution, ReLU there, min-max scaled, resized,
      min-max scaled again). It fixes the three options below: leave them None.
    - ``score``: ``softmax`` (the article: softmax probability of the target), ``logit``, or
      ``logit_delta`` (masked logit minus the unmasked one). None: the variant's.
    - ``channel_softmax``: softmax of the scores across channels before weighting.
    - ``combine``: ``normalized`` weights the normalised masks M_k (the article); ``raw``
      weights the upsampled raw activations U_k (the authors' code, pytorch-grad-cam).
    - ``skip_constant``: a channel whose upsampled map is constant has an all-zero mask, so
      its masked input is the zero image, the same for every such channel of every frame.
      That one input is scored once (and cached) instead of once per channel. Skipping is
      therefore exact in every variant: with ``combine="normalized"`` the channel adds
      ``s * 0``; with ``combine="raw"`` or ``channel_softmax`` it adds the zero image's score,
      which is what its own pass would have given. The cache assumes the weights do not change
      while the engine lives (call :meth:`clear_cache` if they do).
    - ``max_channels``: Faster Score-CAM; only the N channels of highest activation variance
      of each frame are scored. Off (None) by default.
    - ``dtype``: autocast dtype of the masked passes (``"bf16"``, ``"fp16"``; None = fp32).
      Everything else stays float32: the base pass (activations, masks, logits, targets) and
      :meth:`classify` run in fp32 whatever ``dtype`` is (one forward per frame against K
      masked ones; it keeps the masks exact, see docs/precision.md), the masked inputs are
      built in fp32 and cast inside the model, and scores, softmax and sums are fp32. A masked
      pass whose logits are not finite (fp16 overflow) is recomputed in fp32, never kept.
    - ``channels_last``: run the forwards in channels-last memory format (None, the default:
      on when the model is on CPU, where it is faster for every model measured). The model's 4-D
      weights are converted on entry to each call and the caller's own tensors put back on exit
      (results are unchanged; one weight copy per call). Faster on CUDA with tensor cores and on
      CPU with oneDNN (1.3x for EfficientNet-Lite0 on 2 cores here).
    - ``compile``: ``torch.compile`` the masked passes (mask building, masking and the model
      in one graph; on CUDA with CUDA graphs, mode ``reduce-overhead``). The base pass and
      :meth:`classify` stay eager: they need the layer's hook, or vary in batch size.
    - ``fixed_chunks``: masked passes go in chunks of at most :data:`FIXED_SHAPES` shapes, the
      last chunk padded and its padding rows dropped (:func:`chunk_plan`), so a compiled model
      compiles once per shape. None (default): on when ``compile`` is.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module,
        batch_size: int = 32,
        score: Score | None = None,
        channel_softmax: bool | None = None,
        combine: Combine | None = None,
        skip_constant: bool = True,
        max_channels: int | None = None,
        dtype: str | torch.dtype | None = None,
        channels_last: bool | None = None,
        variant: Variant = "article",
        compile: bool = False,  # the flag's name (--compile)
        fixed_chunks: bool | None = None,
    ) -> None:
        self.weighting = Weighting.resolve(variant, score, channel_softmax, combine)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_channels is not None and max_channels < 1:
            raise ValueError(f"max_channels must be >= 1 or None, got {max_channels}")
        if not any(m is layer for m in model.modules()):
            raise ValueError("layer is not a module of model")
        self.model = model
        self.layer = layer
        self.batch_size = batch_size
        self.score = self.weighting.score
        self.channel_softmax = self.weighting.channel_softmax
        self.combine = self.weighting.combine
        self.skip_constant = skip_constant
        self.max_channels = max_channels
        self.dtype = resolve_dtype(dtype)
        # None: on where oneDNN gains from it, on CPU (raw forwards on the 2-core VM: VGG16
        # 1.4x, ResNet-50 1.4-2x, EfficientNet-Lite0 1.3x and more); off elsewhere unless asked.
        self.channels_last = (
            self._device().type == "cpu" if channels_last is None else channels_last
        )
        self.variant = variant
        self._align_corners = self.weighting.align_corners
        self._mask_eps = self.weighting.mask_eps
        self.compile = compile
        self.fixed_chunks = compile if fixed_chunks is None else fixed_chunks
        self._buffer: torch.Tensor | None = None  # masked inputs of a chunk, reused in a call
        self._masked_logits: MaskedLogits = (
            self._compiled_masked_logits() if compile else self._masked_eager
        )
        self._zero_logits: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ whole maps

    def __call__(
        self,
        x: torch.Tensor,
        targets: int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | None = None,
        topk: int | None = None,
    ) -> ScoreCAMResult:
        """Return the Score-CAM maps of the batch ``x`` (N, 3, S, S).

        ``targets``: None (top-1 of each frame, or its top-``topk``), one class for all frames,
        one class per frame (N,), or several per frame (N, T) -> maps (N, T, S, S).
        """
        base = self.base(x)
        target_ids, squeeze = self.resolve_targets(base.logits, targets, topk)
        shard = self.shard(base, target_ids, 0, base.num_channels)
        maps = combine_shards([shard])
        probs = base.logits.softmax(dim=1).gather(1, target_ids)
        if squeeze:
            maps, target_ids, probs = maps[:, 0], target_ids[:, 0], probs[:, 0]
        return ScoreCAMResult(maps=maps, targets=target_ids, probs=probs, skipped=shard.skipped)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits (N, C) float32 of the unmasked batch (no hooks)."""
        with self._model_state():
            # fp32 whatever the dtype: the same logits, hence targets, as the base pass.
            return self._forward(x.to(self._device()), reduced=False).float()

    @staticmethod
    def resolve_targets(
        logits: torch.Tensor,
        targets: int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | None,
        topk: int | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """Return (targets (N, T) int64 on the logits' device, whether T was implicit)."""
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

    # ------------------------------------------------------------------ shard API

    def base(self, x: torch.Tensor) -> BasePass:
        """Return the base pass of ``x``: one forward for logits and activations."""
        device = self._device()
        x = to_device(x.to(torch.float32), device)
        captured: list[torch.Tensor] = []

        def keep(_module, _inputs, output):
            # A clone: a later in-place op (ReLU(inplace), +=) must not change what we keep.
            captured.append(output.detach().float().clone())

        # Always fp32: the masks and targets of every masked pass come from here. With this
        # pass in fp16, fp16 maps missed r 0.999 of fp32's; in fp32 they keep it
        # (docs/precision.md). One forward per frame against K masked ones.
        with self._model_state(), forward_hook(self.layer, keep):
            logits = self._forward(x, reduced=False).float()
        if len(captured) != 1 or captured[0].dim() != 4:
            shape = tuple(captured[-1].shape) if captured else None
            raise ValueError(f"target layer must run once with a 4-D output, got {shape}")
        acts = captured[0]  # (N, K, h, w)
        n, k = acts.shape[:2]
        if self.max_channels is not None and self.max_channels < k:
            # Faster Score-CAM: the channels of highest spatial variance, kept in id order.
            variance = acts.flatten(2).var(dim=2)  # (N, K)
            channels = variance.topk(self.max_channels, dim=1).indices.sort(dim=1).values
            acts = acts.gather(1, channels[:, :, None, None].expand(-1, -1, *acts.shape[2:]))
        else:
            channels = torch.arange(k, device=device).expand(n, k)
        lows, highs = self._upsampled_range(acts, x.shape[-2:])
        return BasePass(
            x=x, logits=logits, activations=acts, channels=channels, lows=lows, highs=highs
        )

    def shard(
        self,
        base: BasePass,
        targets: torch.Tensor,
        start: int,
        stop: int,
        *,
        keep_scores: bool = True,
    ) -> ShardResult:
        """Return the contribution of channels [start, stop) of ``base`` for ``targets`` (N, T).

        Partials of shards that cover [0, Kc) combine (:func:`combine_shards`) to the maps.
        ``keep_scores=False`` leaves out the per-channel scores (nothing to copy or send).
        """
        kc = base.num_channels
        if not 0 <= start < stop <= kc:
            raise ValueError(f"channel range [{start}, {stop}) is not inside [0, {kc})")
        targets = targets.to(base.x.device)
        acts = base.activations[:, start:stop]  # (N, R, h, w)
        lows, highs = base.lows[:, start:stop], base.highs[:, start:stop]
        constant = self._skipped(lows, highs)
        scores = self._scores(base, targets, acts, lows, highs, constant)  # (N, T, R)
        size = base.x.shape[-2:]
        return self.weighting.shard(scores, acts, lows, highs, size, start, constant, keep_scores)

    def passes(self, base: BasePass) -> torch.Tensor:
        """Return (N, Kc) bool: whether each channel's masked pass runs (False: skipped).

        The work of a shard is the count of its True channels (the distributed explainer
        balances shards by it).
        """
        return ~self._skipped(base.lows, base.highs)

    def channel_logits(self, base: BasePass, channels: torch.Tensor) -> torch.Tensor:
        """Return the logits (R, C) float32 of frame 0 of ``base`` masked by each of ``channels``.

        ``channels`` (R,) are positions in ``base``'s channels; every one gets its masked pass,
        constant or not (the per-stream reuse state asks only for the ones it needs).
        """
        channels = channels.to(device=base.x.device, dtype=torch.int64)
        frames = torch.zeros_like(channels)
        out = torch.empty(channels.numel(), base.logits.shape[1], device=base.x.device)
        passes = self._masked_passes(
            base, base.activations, base.lows, base.highs, frames, channels
        )
        for rows, _f, _c, logits in passes:
            out[rows] = logits
        return out

    def zero_logits(self, base: BasePass) -> torch.Tensor:
        """Return the logits (C,) of the all-zero input: what every constant channel scores."""
        return self._zero_image_logits(base.x)

    def clear_cache(self) -> None:
        """Forget the cached score of the zero image (after changing the model's weights)."""
        self._zero_logits.clear()

    # ------------------------------------------------------------------ internals

    def _skipped(self, lows: torch.Tensor, highs: torch.Tensor) -> torch.Tensor:
        """Return which channels' passes are skipped: constant ones, when ``skip_constant``."""
        constant = highs == lows  # mask is all zero, the masked input is the zero image
        return constant if self.skip_constant else torch.zeros_like(constant)

    def _scores(
        self,
        base: BasePass,
        targets: torch.Tensor,
        acts: torch.Tensor,
        lows: torch.Tensor,
        highs: torch.Tensor,
        constant: torch.Tensor,
    ) -> torch.Tensor:
        """Return the target scores (N, T, R) of every channel's masked input."""
        n, r = constant.shape
        scores = torch.empty(n, targets.shape[1], r, device=base.x.device)
        if bool(constant.any()):  # one host sync per call, not per channel
            zero = self._zero_image_logits(base.x).expand(n, -1)  # (N, C)
            zero_scores = self.weighting.target_scores(zero, targets, base.logits)  # (N, T)
            scores.copy_(zero_scores[..., None].expand_as(scores))
        frames, chans = (~constant).nonzero(as_tuple=True)  # masked passes to run (one sync)
        for _rows, f, c, logits in self._masked_passes(base, acts, lows, highs, frames, chans):
            scores[f, :, c] = self.weighting.target_scores(logits, targets[f], base.logits[f])
        return scores

    def _masked_passes(
        self,
        base: BasePass,
        acts: torch.Tensor,
        lows: torch.Tensor,
        highs: torch.Tensor,
        frames: torch.Tensor,
        chans: torch.Tensor,
    ) -> Iterator[tuple[slice | torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (passes, frames (B,), channels (B,), logits (B, C)) of the masked passes.

        Pass p masks frame ``frames[p]`` of ``base.x`` with channel ``chans[p]`` of ``acts``
        (N, R, h, w), whose upsampled range is ``lows``/``highs`` (N, R); ``passes`` says which
        p each row is. In chunks, in order; then, with reduced precision, the passes whose
        logits were not finite (fp16 overflow) again in fp32, which replace them.
        """
        plan = chunk_plan(frames.numel(), self.batch_size, self.fixed_chunks)
        if not plan:
            return
        # Per pass (P of them): its channel (P, h, w), the min and the span of its upsampled map.
        pass_acts = acts[frames, chans]
        pass_lows = lows[frames, chans]
        pass_spans = (highs - lows)[frames, chans] + self._mask_eps
        padding = sum(padded - rows for rows, padded in plan)
        if padding:  # the padding rows repeat pass 0; their scores are dropped
            frames = torch.cat([frames, frames[:1].expand(padding)])
            chans = torch.cat([chans, chans[:1].expand(padding)])
            pass_acts = torch.cat([pass_acts, pass_acts[:1].expand(padding, -1, -1)])
            pass_lows = torch.cat([pass_lows, pass_lows[:1].expand(padding)])
            pass_spans = torch.cat([pass_spans, pass_spans[:1].expand(padding)])
        # Reduced precision: which passes gave non-finite logits (fp16 overflow), checked once
        # after the loop (one host sync per call) and recomputed in fp32.
        nonfinite = None if self.dtype is None else torch.zeros_like(frames, dtype=torch.bool)
        self._buffer = None
        try:
            with self._model_state():
                i = 0
                for rows, padded in plan:
                    chunk = slice(i, i + padded)
                    f = frames[chunk]
                    logits = self._masked_logits(
                        base.x, f, pass_acts[chunk], pass_lows[chunk], pass_spans[chunk]
                    )  # (B, C)
                    if nonfinite is not None:
                        nonfinite[i : i + rows] = ~torch.isfinite(logits[:rows]).all(dim=1)
                    # Slices with host-known bounds: no device sync inside the loop.
                    yield slice(i, i + rows), f[:rows], chans[chunk][:rows], logits[:rows]
                    i += padded
                if nonfinite is None or not bool(nonfinite.any()):
                    return
                redo = nonfinite.nonzero().flatten()  # (Q,) passes to run again in fp32
                log.warning(
                    "%d of %d masked passes overflowed in %s: recomputed in fp32",
                    redo.numel(),
                    sum(rows for rows, _ in plan),
                    self.dtype,
                )
                for j in range(0, redo.numel(), self.batch_size):
                    q = redo[j : j + self.batch_size]
                    logits = self._masked_eager(
                        base.x, frames[q], pass_acts[q], pass_lows[q], pass_spans[q], reduced=False
                    )  # (B, C)
                    yield q, frames[q], chans[q], logits  # they replace what those rows gave
        finally:
            self._buffer = None

    def _masked_eager(
        self,
        x: torch.Tensor,
        frames: torch.Tensor,
        channels: torch.Tensor,
        lows: torch.Tensor,
        spans: torch.Tensor,
        reduced: bool = True,
    ) -> torch.Tensor:
        """Return the logits (B, C) float32 of ``x[frames]`` masked by the channels' M_k.

        ``reduced=False`` runs the model in fp32 whatever the engine's dtype.
        """
        b = frames.numel()
        size = x.shape[-2:]
        mask = _normalised_masks(channels, lows, spans, size, self._align_corners)  # (B,1,S,S)
        if self._buffer is None or self._buffer.shape[0] < b:
            self._buffer = torch.empty(b, *x.shape[1:], device=x.device)
        masked = torch.mul(x[frames], mask, out=self._buffer[:b])  # (B, 3, S, S)
        return self._forward(masked, reduced).float()

    def _compiled_masked_logits(self) -> MaskedLogits:
        """Return :meth:`_masked_eager` compiled: masks, masking and model in one graph."""

        align_corners = self._align_corners

        def masked_logits(inputs, channels, lows, spans) -> torch.Tensor:
            size = inputs.shape[-2:]
            mask = _normalised_masks(channels, lows, spans, size, align_corners)  # (B,1,S,S)
            return self._forward(inputs * mask).float()

        device = self._device()
        # CUDA graphs (reduce-overhead) replay each fixed chunk shape without launch overhead.
        mode = "reduce-overhead" if device.type == "cuda" else None
        compiled = torch.compile(masked_logits, mode=mode, dynamic=False)

        def step(x, frames, channels, lows, spans) -> torch.Tensor:
            if device.type == "cuda":
                # A new CUDA-graph step: the previous chunk's logits were consumed already.
                torch.compiler.cudagraph_mark_step_begin()
            # Gathered here, not in the graph: the graph's shapes then do not depend on how many
            # frames the call has (B x 3 x S x S more bytes, against a whole forward per row).
            return compiled(x[frames], channels, lows, spans)  # (B, C)

        return step

    def _upsampled_range(self, acts: torch.Tensor, size: torch.Size) -> tuple[torch.Tensor, ...]:
        """Return (min, max) (N, Kc) of every channel upsampled to ``size``, in chunks."""
        n, k = acts.shape[:2]
        lows = torch.empty(n, k, device=acts.device)
        highs = torch.empty(n, k, device=acts.device)
        step = max(1, self.batch_size * 4)
        for i in range(0, k, step):
            up = F.interpolate(
                acts[:, i : i + step], size=size, mode="bilinear", align_corners=self._align_corners
            ).flatten(2)  # (N, step, S*S)
            lows[:, i : i + step], highs[:, i : i + step] = up.amin(dim=2), up.amax(dim=2)
        return lows, highs

    def _zero_image_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits (C,) float32 of the all-zero input, cached per shape and device.

        Computed once per shape, so in fp32 whatever the dtype (it costs nothing).
        """
        key = (tuple(x.shape[1:]), x.device)
        if key not in self._zero_logits:
            with self._model_state():
                zero = torch.zeros(1, *x.shape[1:], device=x.device)
                self._zero_logits[key] = self._forward(zero, reduced=False).float()[0]
        return self._zero_logits[key]

    def _forward(self, x: torch.Tensor, reduced: bool = True) -> torch.Tensor:
        """Return the model's output for ``x``: autocast to the dtype when ``reduced``."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is None or not reduced:
            return self.model(x)
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x)

    def _device(self) -> torch.device:
        return model_device(self.model)

    def _model_state(self) -> contextlib.AbstractContextManager[None]:
        """Return the engine's hold on its model: :func:`model_state` with its channels-last."""
        return model_state(self.model, channels_last=self.channels_last)
