"""The worker (a plain class: one model replica on one device) and the in-process explainer.

:class:`Worker` is what a Ray actor holds (``distributed/pool.py`` wraps it with ``ray.remote``);
:class:`LocalExplainer` drives one worker in this process. Both explainers give the pipeline
the same thing: per-frame results, in frame order.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Protocol, TypeVar

import numpy as np
import torch

from .config import EngineConfig, EvaluationConfig, ModelConfig
from .evaluation import FrameScorer
from .models import ModelMeta, load_model
from .records import FrameResult, FrameScores, FrameTask, make_result
from .reuse import FrameView, ReuseOptions, StreamState
from .scorecam import ScoreCAM
from .targets import for_frame, probabilities
from .transfer import normalize_on_device, to_device
from .weighting import BasePass, ShardResult, combine_shards

log = logging.getLogger(__name__)

P = TypeVar("P")

_MIB = 1 << 20
_malloc_tuned = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks up to 1 GiB for reuse; return whether it took effect.

    The engine allocates and frees the same large activation buffers in every batch of masked
    passes. By default glibc serves blocks over its mmap threshold (at most 32 MiB) with mmap
    and unmaps them on free, so every batch page-faults its memory in again: on the 2-core VM a
    third of the CPU time went to the kernel and a frame took 1.48x longer (EfficientNet-Lite0
    at 128 px, 1 thread). Memory then stays at its peak, which the next batch reaches anyway.
    Once per process; Linux with glibc only (elsewhere nothing changes).
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    # mallopt(M_MMAP_THRESHOLD=-3 / M_TRIM_THRESHOLD=-1 / M_TOP_PAD=-2, bytes) returns 1 on success
    done = (
        mallopt(-3, 1024 * _MIB) == 1
        and mallopt(-1, 2048 * _MIB) == 1
        and mallopt(-2, 64 * _MIB) == 1
    )
    _malloc_tuned = done
    log.debug("glibc malloc keeps freed blocks: %s", done)
    return done


class Worker:
    """One model replica on one device, computing whole frames or channel shards of frames.

    Keeps the base pass (activations, logits) of its ``cache_frames`` most recent frames, so
    several shards of one frame cost one base forward on this worker.
    """

    def __init__(
        self,
        model: ModelConfig,
        engine: EngineConfig,
        threads: int | None = None,
        cache_frames: int = 16,
        evaluation: EvaluationConfig | None = None,
    ) -> None:
        # torch's threads are the process's: LocalExplainer.close gives the caller's back.
        self.threads_before = torch.get_num_threads() if threads else None
        if threads:
            torch.set_num_threads(threads)
        if not model.device.startswith("cuda"):
            keep_freed_memory()  # CPU tensors live in malloc'ed memory: see keep_freed_memory
        self.loaded = load_model(
            model.spec,
            model.layer,
            model.weights,
            model.device,
            model.input_size,
            mean=model.mean,
            std=model.std,
            fit=model.fit,
        )
        self.engine = ScoreCAM(self.loaded.model, self.loaded.layer, **engine.engine_kwargs())
        self.device = torch.device(model.device)
        self.cache_frames = cache_frames
        self._cache: OrderedDict[Hashable, BasePass] = OrderedDict()
        self.scorer: FrameScorer | None = None  # --metrics: scores each map here, by the model
        if evaluation is not None and evaluation.enabled:
            self.scorer = FrameScorer(
                self.loaded.model,
                self.loaded.layer,
                steps=evaluation.metric_steps,
                batch_size=engine.batch_size,
                baseline=evaluation.baseline,
            )

    def info(self) -> dict[str, object]:
        """Return where this worker runs: host, pid, device, threads (for logs and tests)."""
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "layer": self.loaded.layer_name,
        }

    def meta(self) -> ModelMeta:
        """Return the model's preprocessing and class names."""
        return self.loaded.meta

    def base(self, index: Hashable, x: torch.Tensor) -> BasePass:
        """Return the (cached) base pass of frame ``index`` with model input ``x`` (3, S, S).

        ``index`` is the cache key: unique among all the frames this worker is sent.
        """
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        base = self.engine.base(self.model_input(x[None]))
        self._cache[index] = base
        while len(self._cache) > self.cache_frames:
            self._cache.popitem(last=False)
        return base

    def targets_and_passes(
        self, index: Hashable, x: torch.Tensor, fixed: Sequence[int] | None, topk: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (targets (T,), their probabilities (T,), passes (Kc,) bool) of a frame, on CPU.

        The targets are ``fixed`` or the frame's top-``topk`` classes; ``passes`` says which
        channels' masked passes will run: the work of each channel (a distributed frame is split
        into shards by it). The base pass is kept.
        """
        base = self.base(index, x)
        logits = base.logits[0]
        targets = for_frame(logits, fixed, topk)
        probs = probabilities(logits, targets)
        return targets.cpu(), probs.cpu(), self.engine.passes(base)[0].cpu()

    def shard(
        self, index: Hashable, x: torch.Tensor, targets: torch.Tensor, start: int, stop: int
    ) -> ShardResult:
        """Return channels [start, stop) of frame ``index`` for ``targets`` (T,), on CPU.

        Without the per-channel scores: the driver only sums the partial maps.
        """
        base = self.base(index, x)
        targets = targets.to(self.device)[None]
        return self.engine.shard(base, targets, start, stop, keep_scores=False).to("cpu")

    def view(
        self, index: Hashable, x: torch.Tensor, fixed: Sequence[int] | None, topk: int
    ) -> tuple[torch.Tensor, torch.Tensor, FrameView]:
        """Return (targets (T,), their probabilities (T,), the frame's view), on CPU.

        What the per-stream reuse state needs (``--fidelity`` below 1); the base pass is kept.
        """
        base = self.base(index, x)
        logits = base.logits[0]
        targets = for_frame(logits, fixed, topk)
        view = FrameView.of(base, self.engine.zero_logits(base))
        return targets.cpu(), probabilities(logits, targets).cpu(), view

    def channel_logits(
        self, index: Hashable, x: torch.Tensor, channels: torch.Tensor
    ) -> torch.Tensor:
        """Return the masked-pass logits (R, C) on CPU of frame ``index`` for ``channels`` (R,)."""
        return self.engine.channel_logits(self.base(index, x), channels).cpu()

    def explain(
        self, task: FrameTask, topk: int = 1, state: StreamState | None = None
    ) -> FrameResult:
        """Return the whole result of one frame (every channel in one shard).

        With a stream's reuse ``state``, only the passes it plans run (the rest are reused).
        """
        began = time.perf_counter()
        if state is not None:
            result = self._explain_reusing(task, topk, state, began)
        else:
            base = self.base(task.index, task.x)
            logits = base.logits[0]
            targets = for_frame(logits, task.targets, topk)
            shard = self.engine.shard(
                base, targets.to(self.device)[None], 0, base.num_channels, keep_scores=False
            )
            maps = combine_shards([shard])[0]
            skipped = int(shard.skipped[0])
            probs = probabilities(logits, targets)
            seconds = time.perf_counter() - began
            passes = base.num_channels - skipped
            result = make_result(task.index, maps, targets, probs, skipped, seconds, passes)
        self._cache.pop(task.index, None)  # a whole frame is never asked for again
        if self.scorer is None:
            return result
        target = int(result.targets[0])
        return dataclasses.replace(result, scores=self.score(task.x, result.maps[0], target))

    def _explain_reusing(
        self, task: FrameTask, topk: int, state: StreamState, began: float
    ) -> FrameResult:
        targets, probs, view = self.view(task.index, task.x, task.targets, topk)
        plan = state.plan(view, targets)
        while plan.channels.numel():  # round after round, until the map settles
            state.absorb(plan, self.channel_logits(task.index, task.x, plan.channels))
        outcome = state.finish(plan)
        skipped = int((~view.live).sum())
        seconds = time.perf_counter() - began
        return make_result(task.index, outcome.maps, targets, probs, skipped, seconds, 0, outcome)

    def score(self, x: torch.Tensor, map_: np.ndarray, target: int | torch.Tensor) -> FrameScores:
        """Return the faithfulness scores of one frame's map (S, S) for ``target``."""
        if self.scorer is None:
            raise RuntimeError("this worker was started without metrics")
        return self.scorer(self.model_input(x[None])[0], map_, int(target))

    def classify_frames(self, xs: torch.Tensor) -> torch.Tensor:
        """Return the logits (N, C) on CPU of a stack of model inputs (no caching)."""
        return self.engine.classify(self.model_input(xs)).cpu()

    def model_input(self, xs: torch.Tensor) -> torch.Tensor:
        """Return the float model input (N, 3, S, S) on this worker's device.

        ``xs``: resized uint8 frames (N, S, S, 3), normalised here, or float model inputs.
        """
        if xs.dtype == torch.uint8:
            return normalize_on_device(xs, self.loaded.mean, self.loaded.std, self.device)
        return to_device(xs, self.device)


class Explainer(Protocol):
    """What the pipeline needs from an explainer (in-process or Ray)."""

    @property
    def meta(self) -> ModelMeta:
        """Return the model's preprocessing and class names."""
        ...

    def classify(self, xs: torch.Tensor) -> torch.Tensor:
        """Return logits (N, C) on CPU."""
        ...

    def explain(
        self, items: Iterable[tuple[P, FrameTask | None]], reuse: ReuseOptions | None = None
    ) -> Iterator[tuple[P, FrameResult | None]]:
        """Yield (payload, result) in the order of ``items``; a None task passes through.

        One call is one stream; ``reuse``: how it reuses masked passes (None: exact).
        """
        ...

    def workers_up(self) -> int:
        """Return how many workers take calls now (called from any thread; cheap)."""
        ...


class OwnedExplainer(Explainer, Protocol):
    """An explainer with workers to release: whoever made it closes it."""

    def close(self) -> None:
        """Release workers."""
        ...


class LocalExplainer:
    """Explains frames in this process with one :class:`Worker`."""

    def __init__(self, worker: Worker, topk: int = 1) -> None:
        self.worker = worker
        self.topk = topk
        self.meta = worker.meta()

    def classify(self, xs: torch.Tensor) -> torch.Tensor:
        """Return logits (N, C) on CPU."""
        return self.worker.classify_frames(xs)

    def explain(
        self, items: Iterable[tuple[P, FrameTask | None]], reuse: ReuseOptions | None = None
    ) -> Iterator[tuple[P, FrameResult | None]]:
        """Yield (payload, result) in order, one frame at a time.

        One call is one stream: with ``reuse`` below fidelity 1 it has its own reuse state.
        """
        state = self.stream_state(reuse)
        for payload, task in items:
            yield payload, (None if task is None else self.explain_frame(task, state))

    def stream_state(self, reuse: ReuseOptions | None) -> StreamState | None:
        """Return a new stream's reuse state (None: exact, every pass every frame)."""
        if reuse is None or reuse.exact:
            return None
        return StreamState(self.worker.engine.weighting, reuse)

    def explain_frame(self, task: FrameTask, state: StreamState | None) -> FrameResult:
        """Return one frame's result, reusing what ``state`` (its stream's) holds."""
        return self.worker.explain(task, self.topk, state)

    def workers_up(self) -> int:
        """Return 1: the one worker in this process."""
        return 1

    def close(self) -> None:
        """Give this process back the torch threads it had before the worker set its own."""
        if self.worker.threads_before is not None:
            torch.set_num_threads(self.worker.threads_before)
