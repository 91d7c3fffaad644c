"""Pure planning: shard ranges, default bounds, the reorder buffer, frame bookkeeping."""

from __future__ import annotations

import itertools
import random

import pytest

from scorecam_stream.scheduler.inflight import InflightTracker, ReorderBuffer
from scorecam_stream.scheduler.planning import (
    MAX_INFLIGHT_FRAMES,
    balanced_ranges,
    default_max_inflight,
    default_shards_per_frame,
    max_held_items,
    plan_actor_resources,
    shard_ranges,
)


def check_ranges(num_channels: int, num_shards: int) -> None:
    ranges = shard_ranges(num_channels, num_shards)
    assert len(ranges) == min(num_channels, num_shards)
    assert ranges[0][0] == 0 and ranges[-1][1] == num_channels
    for (_, stop), (start, _) in itertools.pairwise(ranges):
        assert stop == start  # contiguous, in order: every channel exactly once
    sizes = [stop - start for start, stop in ranges]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_shard_ranges_cover_every_channel_once_for_all_small_cases():
    for num_channels in range(1, 70):
        for num_shards in range(1, 80):
            check_ranges(num_channels, num_shards)


@pytest.mark.parametrize(
    ("num_channels", "num_shards"),
    [(512, 8), (512, 3), (1280, 7), (2048, 64), (1, 1), (1, 100), (7, 7), (100_003, 97)],
)
def test_shard_ranges_real_layers_and_edges(num_channels, num_shards):
    check_ranges(num_channels, num_shards)


def test_shard_ranges_examples_and_errors():
    assert shard_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_ranges(3, 5) == [(0, 1), (1, 2), (2, 3)]
    assert shard_ranges(512, 1) == [(0, 512)]
    with pytest.raises(ValueError, match="num_channels"):
        shard_ranges(0, 2)
    with pytest.raises(ValueError, match="num_shards"):
        shard_ranges(5, 0)


def test_defaults_scale_with_workers_and_stay_bounded():
    assert [default_shards_per_frame(n) for n in (1, 2, 8)] == [1, 2, 8]
    inflight = [default_max_inflight(n) for n in range(1, 200)]
    assert inflight[0] == 3 and inflight == sorted(inflight)
    assert max(inflight) == MAX_INFLIGHT_FRAMES
    assert all(f >= 3 for f in inflight)  # always a frame being computed and one queued
    held = [max_held_items(n) for n in range(1, 200)]
    assert held == sorted(held) and all(h > n for n, h in enumerate(held, start=1))
    for bad in (default_shards_per_frame, default_max_inflight, max_held_items):
        with pytest.raises(ValueError):
            bad(0)


def test_reorder_buffer_yields_in_order_under_shuffled_completion():
    rng = random.Random(0)
    for trial in range(50):
        n = rng.randint(1, 60)
        order = list(range(n))
        rng.shuffle(order)
        buffer: ReorderBuffer[str] = ReorderBuffer()
        out: list[str] = []
        for pushed, i in enumerate(order, start=1):
            buffer.push(i, f"item{i}")
            out += buffer.pop_ready()
            assert len(buffer) == pushed - len(out)  # held: arrived and not out yet
            assert buffer.next_index == len(out)
        assert out == [f"item{i}" for i in range(n)], trial
        assert len(buffer) == 0 and buffer.next_index == n


def test_reorder_buffer_pop_one_and_duplicates():
    buffer: ReorderBuffer[int] = ReorderBuffer()
    buffer.push(1, 11)
    assert buffer.pop() is None  # 0 has not arrived
    buffer.push(0, 10)
    assert buffer.pop() == 10 and buffer.pop() == 11 and buffer.pop() is None
    with pytest.raises(ValueError, match="already"):
        buffer.push(1, 11)
    buffer.push(2, 12)
    with pytest.raises(ValueError, match="already"):
        buffer.push(2, 12)


def test_tracker_bound_partials_in_shard_order_and_release():
    rng = random.Random(1)
    tracker: InflightTracker[str] = InflightTracker(max_frames=3)
    for frame in range(3):
        tracker.admit(frame)
    assert tracker.full and len(tracker) == 3
    with pytest.raises(RuntimeError, match="in flight"):
        tracker.admit(3)
    for frame in range(3):
        ranges = shard_ranges(10, 4)
        tracker.plan(frame, ranges)
        assert tracker.ranges(frame) == ranges and tracker.outstanding(frame) == [0, 1, 2, 3]
        shards = list(range(4))
        rng.shuffle(shards)
        for n, shard in enumerate(shards):
            complete = tracker.done(frame, shard, f"f{frame}s{shard}")
            assert complete == (n == 3) == tracker.complete(frame)
            assert not tracker.done(frame, shard, "again")  # a call sent twice counts once
        assert tracker.take_partials(frame) == [f"f{frame}s{s}" for s in range(4)]
    assert tracker.full  # complete frames keep their slot until they have left
    tracker.release(1)
    assert not tracker.full and 1 not in tracker and 0 in tracker
    tracker.admit(3)
    assert tracker.full


def test_tracker_replans_a_complete_frame_for_its_next_round():
    tracker: InflightTracker[str] = InflightTracker(2)
    tracker.admit(0)
    tracker.plan(0, [(0, 2), (2, 4)])
    assert tracker.done(0, 1, "a1") is False
    with pytest.raises(ValueError, match="not complete"):
        tracker.replan(0, [(0, 1)])  # a round still out cannot be replaced
    assert tracker.done(0, 0, "a0")
    assert tracker.take_partials(0) == ["a0", "a1"]
    tracker.replan(0, [(0, 3)])  # the next round: one shard, outstanding again
    assert tracker.ranges(0) == [(0, 3)] and tracker.outstanding(0) == [0]
    assert not tracker.complete(0)
    assert tracker.done(0, 0, "b0") and tracker.take_partials(0) == ["b0"]


def test_tracker_rejects_misuse():
    tracker: InflightTracker[int] = InflightTracker(max_frames=2)
    tracker.admit(0)
    with pytest.raises(ValueError, match="already in flight"):
        tracker.admit(0)
    with pytest.raises(ValueError, match="not planned"):
        tracker.ranges(0)
    with pytest.raises(ValueError, match="no shard"):
        tracker.done(0, 0, 1)
    tracker.plan(0, [(0, 5), (5, 9)])
    with pytest.raises(ValueError, match="already planned"):
        tracker.plan(0, [(0, 9)])
    with pytest.raises(ValueError, match="not complete"):
        tracker.take_partials(0)
    with pytest.raises(ValueError, match="no shard"):
        tracker.done(0, 2, 1)
    with pytest.raises(ValueError):
        InflightTracker(0)


def check_balanced(costs: list[int], num_shards: int) -> list[tuple[int, int]]:
    ranges = balanced_ranges(costs, num_shards)
    assert len(ranges) == min(num_shards, len(costs))
    assert ranges[0][0] == 0 and ranges[-1][1] == len(costs)
    for (_, stop), (start, _) in itertools.pairwise(ranges):
        assert stop == start
    assert all(stop > start for start, stop in ranges)
    return ranges


def test_balanced_ranges_split_the_passes_evenly():
    rng = random.Random(0)
    for _ in range(3000):
        k = rng.randint(1, 60)
        density = rng.random()
        # Constant channels in runs, as in real layers: blocks of ones and zeros.
        costs = [int(rng.random() < density) for _ in range(k)]
        shards = rng.randint(1, 12)
        ranges = check_balanced(costs, shards)
        loads = [sum(costs[a:b]) for a, b in ranges]
        assert sum(loads) == sum(costs)
        if sum(costs) >= len(ranges):
            assert max(loads) - min(loads) <= 1, (costs, shards, ranges)


def test_balanced_ranges_examples_and_errors():
    # Equal lengths would give loads 4 and 0; the cut moves to where half the work is done.
    assert balanced_ranges([1, 1, 1, 1, 0, 0, 0, 0], 2) == [(0, 2), (2, 8)]
    assert balanced_ranges([0, 0, 0, 0], 3) == shard_ranges(4, 3)  # no work: equal lengths
    assert balanced_ranges([5, 0, 0], 3) == [(0, 1), (1, 2), (2, 3)]  # never empty
    assert balanced_ranges([1, 1, 1], 1) == [(0, 3)]
    with pytest.raises(ValueError, match="num_shards"):
        balanced_ranges([1, 1], 0)
    with pytest.raises(ValueError, match="costs"):
        balanced_ranges([1, -1], 2)
    with pytest.raises(ValueError, match="num_channels"):
        balanced_ranges([], 2)


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("per_gpu", [1, 2, 3, 4, 7])
def test_workers_per_gpu_plans_fractional_gpus(gpus, per_gpu):
    plan = plan_actor_resources(
        on_gpu=True, gpus=gpus, workers_per_gpu=per_gpu, workers=0, cluster_cpus=16
    )
    assert plan.workers == gpus * per_gpu and plan.gpus_needed == gpus
    assert 0 < plan.num_gpus <= 1 and plan.num_gpus * per_gpu <= 1  # K of them fit on one GPU
    assert plan.num_gpus * per_gpu > 1 - 1e-3  # and together they take (almost) all of it
    assert plan.num_gpus == round(plan.num_gpus, 4)  # Ray's resource precision
    assert (plan.num_gpus == 1) == (per_gpu == 1)
    assert plan.threads is None
    assert plan.options() == {"num_gpus": plan.num_gpus, "num_cpus": 1}
    # packing the actors GPU by GPU by their share puts exactly per_gpu on each
    free = [1.0] * gpus
    for _ in range(plan.workers):
        slot = next(i for i, f in enumerate(free) if f >= plan.num_gpus - 1e-12)
        free[slot] -= plan.num_gpus
    assert all(f < plan.num_gpus for f in free)


def test_cpu_and_single_gpu_plans():
    cpu = plan_actor_resources(on_gpu=False, gpus=0, workers_per_gpu=1, workers=3, cluster_cpus=8)
    assert (cpu.workers, cpu.num_gpus, cpu.threads, cpu.gpus_needed) == (3, 0.0, 2, 0)
    assert cpu.options() == {"num_cpus": 1}
    pinned = plan_actor_resources(
        on_gpu=False, gpus=0, workers_per_gpu=1, workers=3, cluster_cpus=8, threads_per_worker=5
    )
    assert pinned.threads == 5
    one = plan_actor_resources(on_gpu=False, gpus=0, workers_per_gpu=1, workers=0, cluster_cpus=1)
    assert (one.workers, one.threads) == (1, 1)
    # --workers N --device cuda (or --address alone): one whole GPU per worker
    cuda = plan_actor_resources(on_gpu=True, gpus=0, workers_per_gpu=1, workers=2, cluster_cpus=4)
    assert (cuda.workers, cuda.num_gpus, cuda.gpus_needed) == (2, 1.0, 2)
    with pytest.raises(ValueError):
        plan_actor_resources(on_gpu=True, gpus=0, workers_per_gpu=2, workers=1, cluster_cpus=4)
    with pytest.raises(ValueError):
        plan_actor_resources(on_gpu=True, gpus=1, workers_per_gpu=0, workers=0, cluster_cpus=4)
