"""The explainer over Ray: a :class:`ShardedExplainer` whose pool is Ray actors.

:class:`RayExplainer` opens the :class:`~.session.RaySession`, plans each actor's resources
(:func:`~scorecam_stream.scheduler.plan_actor_resources`), starts the
:class:`~.pool.ActorPool` of :class:`~scorecam_stream.workers.Worker` actors, and closes them
all again.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from ..config import DistributedConfig, EngineConfig, EvaluationConfig, ModelConfig
from ..errors import ScoreCamError
from ..models import ModelMeta
from ..scheduler.health import RetryPolicy
from ..scheduler.planning import (
    default_max_inflight,
    default_shards_per_frame,
    plan_actor_resources,
)
from ..weighting import Weighting
from ..workers import Worker
from .explainer import ShardedExplainer
from .pool import ActorPool, start_actors
from .session import RaySession, describe_options

log = logging.getLogger(__name__)


class RayExplainer(ShardedExplainer):
    """:class:`ShardedExplainer` over Ray actors, each a :class:`Worker` (one model replica).

    ``RayExplainer(model, engine, dist, topk)`` connects to the cluster at ``dist.address`` (or
    starts a local Ray instance, or reuses the one this process already initialised), starts
    ``dist.gpus`` GPU workers or ``dist.workers`` CPU workers and waits for them. Use it as a
    context manager or call :meth:`close`. ``worker_cls``: :class:`Worker` or a subclass.
    ``live``: one frame in flight whatever ``dist`` says (its passes spread over every worker,
    so its map is ready soonest; the next frame is the newest one when this one is done), and
    concurrent runs (live streams sharing the workers) served in turn, frame by frame
    (``ShardedExplainer(fair=True)``).
    """

    def __init__(
        self,
        model: ModelConfig,
        engine: EngineConfig,
        dist: DistributedConfig,
        topk: int = 1,
        *,
        worker_cls: type[Worker] = Worker,
        evaluation: EvaluationConfig | None = None,
        live: bool = False,
    ) -> None:
        if topk < 1:
            raise ScoreCamError(f"--topk must be >= 1, got {topk}")
        # --metrics: each frame's metric passes run on a worker too, after its shards.
        evaluation = evaluation if evaluation is not None and evaluation.enabled else None
        workers = dist.num_workers
        max_inflight = 1 if live else dist.max_inflight_frames or default_max_inflight(workers)
        self.session = RaySession(dist)
        self._pool: ActorPool | None = None
        try:
            cpus, gpus = self.session.resources()
            on_gpu = model.device.startswith("cuda")
            plan = plan_actor_resources(
                on_gpu=on_gpu,
                gpus=dist.gpus,
                workers_per_gpu=dist.workers_per_gpu,
                workers=dist.workers,
                cluster_cpus=cpus,
                threads_per_worker=dist.threads_per_worker,
            )
            if on_gpu:
                _check_gpus(dist, workers, gpus, plan.gpus_needed)
                # Ray makes each actor's GPU visible to it as cuda:0 (shared with K-1 others).
                model = dataclasses.replace(model, device="cuda")
            options = plan.options()
            # Enough cached base passes that frames still in flight are never evicted.
            cache_frames = max(16, max_inflight + 4)
            args = (model, engine, plan.threads, cache_frames, evaluation)
            log.info(
                "starting %d Ray workers (%s, %s threads each)",
                workers,
                options,
                plan.threads or "default",
            )
            actors = start_actors(worker_cls, args, workers, options)
            self._pool = pool = ActorPool(actors, dist.startup_timeout)
            self._infos = pool.wait_started(
                f"(the cluster has {cpus} CPUs and {gpus} GPUs, each worker needs "
                f"{describe_options(options)}): ask for fewer workers or raise --startup-timeout"
            )
            meta = pool.call("meta")
        except BaseException:
            self.close()
            raise
        super().__init__(
            pool,
            meta,
            topk=topk,
            shards_per_frame=dist.shards_per_frame or default_shards_per_frame(workers),
            max_inflight=max_inflight,
            policy=RetryPolicy(max_failures=dist.max_shard_retries),
            scoring=evaluation is not None,
            weighting=Weighting.resolve(
                engine.variant, engine.score, engine.channel_softmax, engine.combine
            ),
            fair=live,
        )

    @property
    def actors(self) -> list[Any]:
        """Return the workers' actor handles."""
        return self._pool.actors if self._pool is not None else []

    @property
    def restarts(self) -> int:
        """Return how many times a dead worker came back."""
        return self._pool.restarts if self._pool is not None else 0

    def worker_info(self) -> list[dict[str, Any]]:
        """Return each worker's host, pid, node, device and threads (waits for restarting ones)."""
        if self._closed or self._pool is None:
            raise RuntimeError("the explainer is closed")
        return [self._pool.where(slot) for slot in self._pool.slots]

    def portable(self) -> PortableExplainer:
        """Return what another Ray process needs to explain frames on these same workers."""
        if self._closed or self._pool is None:
            raise RuntimeError("the explainer is closed")
        return PortableExplainer(
            actors=tuple(self._pool.actors),
            meta=self.meta,
            topk=self.topk,
            shards_per_frame=self.shards_per_frame,
            max_inflight=self.max_inflight,
            policy=self.policy,
            scoring=self.scoring,
            timeout=self._pool.timeout,
            weighting=self.weighting,
            fair=self.fair,
        )

    def close(self) -> None:
        """Kill the workers; shut down the Ray instance if this object started it. Idempotent."""
        super().close()
        if self._pool is not None:
            self._pool.kill()
            log.info("closed %d Ray workers", len(self._pool.slots))
        self.session.close()


@dataclass(frozen=True)
class PortableExplainer:
    """A :class:`RayExplainer`'s workers and settings, sent to a Ray task (picklable).

    :meth:`open` there gives an explainer over the same actors: the task's frames are
    explained by the driver's workers, beside the driver's own runs (each actor takes calls
    from both). The driver keeps owning the actors; closing the task's explainer frees nothing.
    """

    actors: tuple[Any, ...]
    meta: ModelMeta
    topk: int
    shards_per_frame: int
    max_inflight: int
    policy: RetryPolicy
    scoring: bool
    timeout: float
    weighting: Weighting
    fair: bool = False

    def open(self) -> ShardedExplainer:
        """Return an explainer over the workers, for this process."""
        pool = ActorPool(list(self.actors), self.timeout, owner=False)
        return ShardedExplainer(
            pool,
            self.meta,
            topk=self.topk,
            shards_per_frame=self.shards_per_frame,
            max_inflight=self.max_inflight,
            policy=self.policy,
            scoring=self.scoring,
            weighting=self.weighting,
            fair=self.fair,
        )


def _check_gpus(dist: DistributedConfig, workers: int, gpus: int, needed: int) -> None:
    """Raise ScoreCamError when the cluster has fewer GPUs than the workers need."""
    if gpus >= needed:
        return
    asked = f"--gpus {workers}" if dist.gpus else f"{workers} worker(s) on --device cuda"
    if dist.workers_per_gpu > 1:
        asked = f"--gpus {dist.gpus} --workers-per-gpu {dist.workers_per_gpu}"
    instead = f"--gpus {gpus}" if gpus else f"--workers {workers} --device cpu"
    raise ScoreCamError(f"{asked}: the Ray cluster has {gpus} GPU(s); use {instead}")
