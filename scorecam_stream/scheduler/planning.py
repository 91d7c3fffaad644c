"""Planning a run: channel ranges of a frame's shards, bounds on the work in flight, actors.

Pure functions of plain numbers (no Ray, no torch), tested without a cluster.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

# The frames in flight hold the payload (often the full-resolution frame) and the model input on
# the driver; beyond this many, more frames add memory without adding throughput, because every
# frame is already split over all the workers.
MAX_INFLIGHT_FRAMES = 32


def shard_ranges(num_channels: int, num_shards: int) -> list[tuple[int, int]]:
    """Return contiguous channel ranges [start, stop) that cover [0, num_channels) once, in order.

    The ranges differ in length by at most one (the longer ones first) and are never empty:
    asking for more shards than channels gives one range per channel.
    """
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    count = min(num_shards, num_channels)
    size, extra = divmod(num_channels, count)
    ranges = []
    start = 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def balanced_ranges(costs: Sequence[int], num_shards: int) -> list[tuple[int, int]]:
    """Return contiguous ranges that cover [0, len(costs)) once, in order, of about equal cost.

    ``costs[i]`` is the work of channel i: its masked forward passes, 1, or 0 for a constant
    channel that the engine skips. Equal-length ranges can differ a lot in work (constant
    channels cluster), and the busiest shard sets a frame's latency; here each cut falls where
    the running cost first reaches its share of the total. With the engine's 0/1 costs and at
    least one pass per shard, the ranges' costs differ by at most one. Ranges are never empty;
    with no cost at all they are the equal-length ones of :func:`shard_ranges`.
    """
    if any(c < 0 for c in costs):
        raise ValueError("costs must be >= 0")
    k = len(costs)
    total = sum(costs)
    if total == 0:
        return shard_ranges(k, num_shards)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    count = min(num_shards, k)
    prefix = list(itertools.accumulate(costs, initial=0))  # prefix[m] = cost of [0, m)
    cuts = [0]
    for j in range(1, count):
        share = -(-j * total // count)  # ceil(j * total / count): integers, no rounding
        at = bisect.bisect_left(prefix, share)  # first m whose prefix reaches the share
        # Never empty: after the previous cut, and room left for the ranges still to come.
        cuts.append(min(max(at, cuts[-1] + 1), k - (count - j)))
    cuts.append(k)
    return list(itertools.pairwise(cuts))


def default_shards_per_frame(num_workers: int) -> int:
    """Return how many shards a frame is split into by default: one per worker.

    Every worker then gets about one shard of every frame, so a frame's latency shrinks with the
    number of workers while each worker runs one base forward per frame (the cost of a shard
    beyond its masked passes: 1 forward in 513 for VGG16 on 8 workers at most 8/513 = 1.6 %).
    Finer shards would balance better within a frame but repeat that base forward on more
    workers; the balance across workers comes instead from several frames being in flight, each
    shard going to whichever worker is free.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    return num_workers


def default_max_inflight(num_workers: int) -> int:
    """Return how many frames may be in flight by default: ``2 + num_workers``, at most 32.

    A frame is split over all the workers, so two frames in flight keep every worker busy (one
    being computed, the next one's shards queued); the extra ``num_workers`` frames absorb a slow
    frame holding up the in-order output while later frames finish behind it.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    return min(2 + num_workers, MAX_INFLIGHT_FRAMES)


def max_held_items(max_inflight: int) -> int:
    """Return how many input items (frames plus pass-through items) may wait for output at once.

    Pass-through items (no task) cost no work but keep their payload until every earlier frame
    is out; this bounds them when frames are explained sparsely (``--every N``).
    """
    if max_inflight < 1:
        raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
    return 8 * max_inflight + 16


# Ray keeps fractional resources to 4 decimal places: a share is rounded down to them, so K
# shares of one GPU never add up to more than the whole GPU.
_RAY_RESOURCE_UNIT = 10_000


@dataclass(frozen=True)
class ActorResources:
    """What the Ray actors of a run reserve: how many, and each one's share of the machine."""

    workers: int  # actors to start
    num_gpus: float  # each actor's GPU share: 1 / workers-per-GPU (0: a CPU worker)
    num_cpus: int  # CPUs each actor reserves
    threads: int | None  # torch threads of each actor (None: torch's default, GPU workers)
    gpus_needed: int  # whole GPUs the cluster must have

    def options(self) -> dict[str, float]:
        """Return the resource options of ``ray.remote`` for one actor."""
        if self.num_gpus:
            return {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus}
        return {"num_cpus": self.num_cpus}


def plan_actor_resources(
    *,
    on_gpu: bool,
    gpus: int,
    workers_per_gpu: int,
    workers: int,
    cluster_cpus: int,
    threads_per_worker: int | None = None,
) -> ActorResources:
    """Return the actors to start and what each reserves.

    On GPUs: ``workers_per_gpu`` (K) actors share each of the ``gpus`` (N) GPUs, 1/K of a GPU
    each, so N x K actors on N GPUs; with ``gpus=0``, ``workers`` actors (at least one) with a
    whole GPU each, as ``--workers N --device cuda`` or ``--address`` alone ask. Several
    replicas per GPU help models too small to keep a large GPU busy alone. On CPUs:
    ``workers`` actors (at least one), each with ``threads_per_worker`` torch threads or an
    equal part of the cluster's CPUs.
    """
    if workers_per_gpu < 1:
        raise ValueError(f"workers_per_gpu must be >= 1, got {workers_per_gpu}")
    if gpus < 0 or workers < 0:
        raise ValueError(f"gpus and workers must be >= 0, got {gpus}, {workers}")
    if workers_per_gpu > 1 and not gpus:
        raise ValueError("workers_per_gpu > 1 needs gpus >= 1")
    if on_gpu:
        whole = gpus or max(workers, 1)
        share = (_RAY_RESOURCE_UNIT // workers_per_gpu) / _RAY_RESOURCE_UNIT
        return ActorResources(
            workers=whole * workers_per_gpu,
            num_gpus=1.0 if workers_per_gpu == 1 else share,
            num_cpus=1,
            threads=None,
            gpus_needed=whole,
        )
    count = max(workers, 1)
    threads = threads_per_worker or max(1, cluster_cpus // count)
    return ActorResources(workers=count, num_gpus=0.0, num_cpus=1, threads=threads, gpus_needed=0)
