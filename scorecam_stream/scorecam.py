"""Score-CAM for one model and one target layer: the engine the workers hold.

:class:`ScoreCAM` runs the article's algorithm (step by step in :mod:`scorecam_stream.weighting`)
batched, with the masked passes of several channels and frames in one forward
(:mod:`scorecam_stream.masked_passes`), and by channel range (:meth:`ScoreCAM.shard`), so that the
passes of one frame can be split over many workers and summed back with
:func:`~scorecam_stream.weighting.combine_shards`. Pure torch, no I/O, no Ray.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .choices import DTYPES, spelled
from .masked_passes import MaskedPasses
from .model_state import forward_hook, model_device, model_state
from .targets import Targets
from .targets import resolve as resolve_targets
from .transfer import to_device
from .weighting import (
    BasePass,
    Combine,
    Score,
    ScoreCAMResult,
    ShardResult,
    Variant,
    Weighting,
    combine_shards,
    upsampled_range,
)

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
        raise ValueError(f"unknown dtype '{dtype}': use {spelled(DTYPES)}")
    return _DTYPES[dtype]


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
    - ``fixed_chunks``: masked passes go in chunks of at most ``FIXED_SHAPES`` shapes, the
      last chunk padded and its padding rows dropped (``masked_passes.chunk_plan``), so a
      compiled model compiles once per shape. None (default): on when ``compile`` is.
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
            model_device(model).type == "cpu" if channels_last is None else channels_last
        )
        self.variant = variant
        self.compile = compile
        self.fixed_chunks = compile if fixed_chunks is None else fixed_chunks
        self._masked_passes = MaskedPasses(
            model,
            self._forward,
            batch_size=batch_size,
            dtype=self.dtype,
            channels_last=self.channels_last,
            align_corners=self.weighting.align_corners,
            mask_eps=self.weighting.mask_eps,
            compile=compile,
            fixed_chunks=self.fixed_chunks,
        )
        self._zero_logits: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ whole maps

    def __call__(
        self,
        x: torch.Tensor,
        targets: Targets = None,
        topk: int | None = None,
    ) -> ScoreCAMResult:
        """Return the Score-CAM maps of the batch ``x`` (N, 3, S, S).

        ``targets``: None (top-1 of each frame, or its top-``topk``), one class for all frames,
        one class per frame (N,), or several per frame (N, T) -> maps (N, T, S, S).
        """
        base = self.base(x)
        target_ids, squeeze = resolve_targets(base.logits, targets, topk)
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
            return self._forward(x.to(model_device(self.model)), reduced=False).float()

    # ------------------------------------------------------------------ shard API

    def base(self, x: torch.Tensor) -> BasePass:
        """Return the base pass of ``x``: one forward for logits and activations."""
        device = model_device(self.model)
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
        # In chunks of 4 batches of channels: only those are upsampled to S x S at once.
        chunk = max(1, self.batch_size * 4)
        lows, highs = upsampled_range(acts, x.shape[-2:], self.weighting.align_corners, chunk)
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
            base.x, base.activations, base.lows, base.highs, frames, channels
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
        passes = self._masked_passes(base.x, acts, lows, highs, frames, chans)
        for _rows, f, c, logits in passes:
            scores[f, :, c] = self.weighting.target_scores(logits, targets[f], base.logits[f])
        return scores

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

    def _model_state(self) -> contextlib.AbstractContextManager[None]:
        """Return the engine's hold on its model: :func:`model_state` with its channels-last."""
        return model_state(self.model, channels_last=self.channels_last)
