"""Score-CAM's masked passes: (frame, channel) pairs through the model, in chunks.

The costly step of Score-CAM: one forward per channel of every frame, of the frame multiplied
by the channel's normalised mask. :class:`MaskedPasses` runs them in chunks of a batch size,
in one reused buffer, under inference mode, with no host sync per pass; compiled with
``torch.compile`` if asked (in a few fixed chunk shapes, :func:`chunk_plan`); and with reduced
precision, it runs again in fp32 the passes whose logits overflowed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .model_state import model_device, model_state
from .weighting import normalised_masks

log = logging.getLogger(__name__)

# (input (B, 3, S, S), reduced: autocast to the engine's dtype) -> the model's output (B, C)
Forward = Callable[[torch.Tensor, bool], torch.Tensor]
# (x (N, 3, S, S), each row's frame (B,), channel (B, h, w), min (B,), span (B,)) -> logits (B, C)
MaskedLogits = Callable[..., torch.Tensor]
# What one masked pass chunk gives: (passes, frames (B,), channels (B,), logits (B, C)).
PassChunk = tuple[slice | torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# With fixed-shape chunks, the batch sizes a forward may have: batch_size, /2, /4. A few shapes
# compile a few times; one shape would pad a shard of 129 passes at batch 256 to 256.
FIXED_SHAPES = 3


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


class MaskedPasses:
    """The masked passes of one model: ``passes(x, acts, lows, highs, frames, chans)``.

    ``forward(input, reduced)`` runs the model (the engine's: autocast to ``dtype`` when
    ``reduced``, channels-last). ``align_corners`` and ``mask_eps`` build the masks as the
    engine's variant does. ``compile``, ``fixed_chunks`` and ``channels_last`` are the engine's
    options of those names (see :class:`scorecam_stream.scorecam.ScoreCAM`).
    """

    def __init__(
        self,
        model: nn.Module,
        forward: Forward,
        *,
        batch_size: int,
        dtype: torch.dtype | None,
        channels_last: bool,
        align_corners: bool,
        mask_eps: float,
        compile: bool,
        fixed_chunks: bool,
    ) -> None:
        self.model = model
        self.forward = forward
        self.batch_size = batch_size
        self.dtype = dtype
        self.channels_last = channels_last
        self.align_corners = align_corners
        self.mask_eps = mask_eps
        self.fixed_chunks = fixed_chunks
        self._buffer: torch.Tensor | None = None  # masked inputs of a chunk, reused in a call
        self._masked_logits: MaskedLogits = self._compiled() if compile else self._eager

    def __call__(
        self,
        x: torch.Tensor,
        acts: torch.Tensor,
        lows: torch.Tensor,
        highs: torch.Tensor,
        frames: torch.Tensor,
        chans: torch.Tensor,
    ) -> Iterator[PassChunk]:
        """Yield (passes, frames (B,), channels (B,), logits (B, C)) of the masked passes.

        Pass p masks frame ``frames[p]`` of ``x`` (N, 3, S, S) with channel ``chans[p]`` of
        ``acts`` (N, R, h, w), whose upsampled range is ``lows``/``highs`` (N, R); ``passes``
        says which p each row is. In chunks, in order; then, with reduced precision, the passes
        whose logits were not finite (fp16 overflow) again in fp32, which replace them.
        """
        plan = chunk_plan(frames.numel(), self.batch_size, self.fixed_chunks)
        if not plan:
            return
        # Per pass (P of them): its channel (P, h, w), the min and the span of its upsampled map.
        pass_acts = acts[frames, chans]
        pass_lows = lows[frames, chans]
        pass_spans = (highs - lows)[frames, chans] + self.mask_eps
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
            with model_state(self.model, channels_last=self.channels_last):
                i = 0
                for rows, padded in plan:
                    chunk = slice(i, i + padded)
                    f = frames[chunk]
                    logits = self._masked_logits(
                        x, f, pass_acts[chunk], pass_lows[chunk], pass_spans[chunk]
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
                    logits = self._eager(
                        x, frames[q], pass_acts[q], pass_lows[q], pass_spans[q], reduced=False
                    )  # (B, C)
                    yield q, frames[q], chans[q], logits  # they replace what those rows gave
        finally:
            self._buffer = None

    def _eager(
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
        mask = normalised_masks(channels, lows, spans, size, self.align_corners)  # (B,1,S,S)
        if self._buffer is None or self._buffer.shape[0] < b:
            self._buffer = torch.empty(b, *x.shape[1:], device=x.device)
        masked = torch.mul(x[frames], mask, out=self._buffer[:b])  # (B, 3, S, S)
        return self.forward(masked, reduced).float()

    def _compiled(self) -> MaskedLogits:
        """Return :meth:`_eager` compiled: masks, masking and model in one graph."""

        align_corners = self.align_corners
        forward = self.forward

        def masked_logits(inputs, channels, lows, spans) -> torch.Tensor:
            size = inputs.shape[-2:]
            mask = normalised_masks(channels, lows, spans, size, align_corners)  # (B,1,S,S)
            return forward(inputs * mask, True).float()

        device = model_device(self.model)
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
