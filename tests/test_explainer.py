"""The frame protocol and its fault handling, over a fake pool of in-process workers (no Ray).

:class:`FakePool` runs each call on a real :class:`Worker` when it is polled and can kill a
worker (its calls in flight come back as lost, and a restarted worker has an empty cache), keep
it down, or let it come back; its clock is fake, so deadlines are reached without waiting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from conftest import seeded_frames

from scorecam_stream import ScoreCamError
from scorecam_stream.config import EngineConfig, EvaluationConfig, ModelConfig
from scorecam_stream.distributed.explainer import ShardedExplainer
from scorecam_stream.distributed.pool import Reply
from scorecam_stream.models import ModelMeta
from scorecam_stream.records import FrameResult, FrameTask
from scorecam_stream.reuse import ReuseOptions
from scorecam_stream.scheduler.health import (
    Failure,
    RetryPolicy,
    Slot,
    SlotState,
    none_left,
    pick_slot,
    probes_due,
)
from scorecam_stream.scheduler.planning import max_held_items
from scorecam_stream.weighting import ShardResult
from scorecam_stream.workers import LocalExplainer, Worker

MODEL = ModelConfig(spec="efficientnet_lite0", input_size=48)
ENGINE = EngineConfig(batch_size=8, max_channels=16)
TIMEOUT = 30.0  # fake seconds with no worker up before the pool gives up
TICK = 0.5  # fake seconds per poll


@dataclass
class _Sent:
    tag: Any
    slot: Slot
    method: str
    args: tuple[Any, ...]
    life: int  # the worker's life when it was sent: a call outlives no death


@dataclass(eq=False)
class FakePool:
    """The pool protocol of ShardedExplainer over in-process workers; see the module docstring."""

    make_worker: Callable[[], Worker]
    size: int
    before_call: Callable[[FakePool, _Sent], None] | None = None  # fault injection
    slots: list[Slot] = field(init=False)
    workers: list[Worker | None] = field(init=False)
    lives: list[int] = field(init=False)  # how often each worker was (re)started
    back_in: list[int | None] = field(init=False)  # polls until a dead worker restarts
    sent: list[_Sent] = field(default_factory=list)
    now: float = 0.0
    calls: list[tuple[int, str]] = field(default_factory=list)  # (slot, method) as run

    def __post_init__(self) -> None:
        self.slots = [Slot(i) for i in range(self.size)]
        self.workers = [self.make_worker() for _ in range(self.size)]
        self.lives = [1] * self.size
        self.back_in = [None] * self.size

    def put(self, value: Any) -> Any:
        return value

    def free(self, prefer: Slot | None = None) -> Slot | None:
        return pick_slot(self.slots, prefer)

    def submit(self, slot: Slot, tag: Any, method: str, *args: Any) -> None:
        slot.busy += 1
        slot.sent += 1
        self.sent.append(_Sent(tag, slot, method, args, self.lives[slot.index]))

    def kill(self, index: int, back_after: int | None) -> None:
        """Kill worker ``index``; it restarts (empty cache) after that many polls, or never."""
        self.workers[index] = None
        self.back_in[index] = back_after

    def poll(self, timeout: float) -> list[Reply]:
        self.now += TICK
        self._probe()
        replies = []
        sent, self.sent = self.sent, []
        for call in sent:
            if self.before_call is not None:
                self.before_call(self, call)
            replies.append(self._run(call))
        if none_left(self.slots, self.now, TIMEOUT):
            raise ScoreCamError("no worker is left")
        return replies

    def _run(self, call: _Sent) -> Reply:
        slot, i = call.slot, call.slot.index
        slot.busy -= 1
        worker = self.workers[i]
        if worker is None or call.life != self.lives[i]:  # died under it
            slot.lost(self.now)
            return Reply(call.tag, slot, failure=Failure("worker died", lost=True))
        try:
            value = getattr(worker, call.method)(*call.args)
        except ScoreCamError as err:
            return Reply(call.tag, slot, failure=Failure(str(err), lost=False, retryable=False))
        except RuntimeError as err:
            return Reply(call.tag, slot, failure=Failure(f"RuntimeError: {err}", lost=False))
        self.calls.append((i, call.method))
        return Reply(call.tag, slot, value=value)

    def _probe(self) -> None:
        due, _ = probes_due(self.slots, self.now)
        for slot in due:
            i = slot.index
            if self.back_in[i] is not None and self.back_in[i] <= 0:
                self.workers[i] = self.make_worker()  # a new process: nothing cached
                self.lives[i] += 1
                self.back_in[i] = None
                slot.back(f"restarted {self.lives[i]}")
            else:
                slot.probe_failed(self.now, dead=False)  # still restarting
        for i, left in enumerate(self.back_in):
            if left is not None:
                self.back_in[i] = left - 1


@dataclass(eq=False)
class HoldingPool(FakePool):
    """A FakePool whose first frame's calls come back only after ``hold`` polls (a straggler)."""

    hold: int = 0
    straggler: Any = None  # the first frame's cache key
    sent_while_held: set[Any] = field(default_factory=set)  # frames given calls meanwhile

    def submit(self, slot: Slot, tag: Any, method: str, *args: Any) -> None:
        if self.straggler is None:
            self.straggler = args[0]
        if self.hold > 0:
            self.sent_while_held.add(args[0])
        super().submit(slot, tag, method, *args)

    def poll(self, timeout: float) -> list[Reply]:
        if self.hold <= 0:
            return super().poll(timeout)
        self.hold -= 1
        held = [c for c in self.sent if c.args[0] == self.straggler]
        self.sent = [c for c in self.sent if c.args[0] != self.straggler]
        replies = super().poll(timeout)
        self.sent = held + self.sent
        return replies


@pytest.fixture(scope="module")
def make_worker() -> Callable[[], Worker]:
    return lambda: Worker(MODEL, ENGINE, cache_frames=8)


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    """Six seeded 48 x 48 model inputs, each with a bright square somewhere."""
    return seeded_frames(6, 48, seed=5)


def items_of(frames: torch.Tensor, marks: str = "") -> list[tuple[str, FrameTask | None]]:
    """Frames with a pass-through item after frame 1 and fixed targets on frame 3."""
    out: list[tuple[str, FrameTask | None]] = []
    for i, x in enumerate(frames):
        out.append((f"{marks}frame{i}", FrameTask(i, x, (5, 2) if i == 3 else None)))
        if i == 1:
            out.append((f"{marks}skip", None))
    return out


@pytest.fixture(scope="module")
def reference(make_worker, frames) -> dict[str, FrameResult | None]:
    return dict(LocalExplainer(make_worker(), topk=2).explain(items_of(frames)))


def explainer_over(pool: FakePool, retries: int = 2, inflight: int = 3) -> ShardedExplainer:
    meta = pool.workers[0].meta()
    policy = RetryPolicy(max_failures=retries)
    return ShardedExplainer(
        pool, meta, topk=2, shards_per_frame=3, max_inflight=inflight, policy=policy
    )


def assert_same(out: list[tuple[str, FrameResult | None]], reference: dict) -> None:
    """Every item came out, once, in input order, with the in-process maps, targets and
    probabilities: a lost or repeated frame fails, as does a frame with another frame's map."""
    assert [payload for payload, _ in out] == list(reference)
    for payload, result in out:
        expected = reference[payload]
        if expected is None:
            assert result is None
            continue
        assert result is not None and result.index == expected.index
        np.testing.assert_array_equal(result.targets, expected.targets)
        np.testing.assert_allclose(result.maps, expected.maps, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.probs, expected.probs, rtol=1e-5)
        assert result.skipped == expected.skipped


@pytest.mark.slow  # six frames through real workers
def test_frames_split_over_workers_match_the_in_process_results(make_worker, frames, reference):
    pool = FakePool(make_worker, 2)
    explainer = explainer_over(pool)
    out = list(explainer.explain(items_of(frames)))
    assert [p for p, _ in out] == list(reference)
    assert_same(out, reference)
    assert {i for i, _ in pool.calls} == {0, 1}  # both workers took calls
    methods = [m for _, m in pool.calls]
    assert methods.count("targets_and_passes") == 6 and methods.count("shard") == 6 * 3
    assert explainer.stats.calls == 6 * 4 and explainer.stats.resubmitted == 0


@pytest.mark.slow  # frames through real workers, twice
def test_a_worker_that_dies_with_calls_in_flight_has_them_resent(make_worker, frames, reference):
    def kill_once(pool: FakePool, call: _Sent) -> None:
        if len(pool.calls) == 5 and pool.workers[0] is not None and pool.lives[0] == 1:
            pool.kill(0, back_after=3)

    pool = FakePool(make_worker, 2, before_call=kill_once)
    explainer = explainer_over(pool)
    out = list(explainer.explain(items_of(frames)))
    assert_same(out, reference)
    assert explainer.stats.resubmitted >= 1  # the dead worker's calls went again
    assert pool.lives[0] == 2 and pool.slots[0].state is SlotState.UP  # it came back
    # ...and was sent work again once back: the next run uses both workers.
    pool.calls.clear()
    assert_same(list(explainer.explain(items_of(frames))), reference)
    assert {i for i, _ in pool.calls} == {0, 1}


@pytest.mark.slow  # frames through real workers
def test_a_restart_in_the_middle_of_a_frame_recomputes_its_base_pass(
    make_worker, frames, reference
):
    """Worker 1 dies after the first frame's classification; it is back, with an empty cache,
    before that frame's shards are all done: its shards recompute the frame's base pass."""

    def kill_after_classify(pool: FakePool, call: _Sent) -> None:
        if call.method == "shard" and pool.lives[1] == 1 and call.slot.index == 1:
            pool.kill(1, back_after=0)

    pool = FakePool(make_worker, 2, before_call=kill_after_classify)
    explainer = explainer_over(pool, inflight=1)  # one frame at a time: the kill lands inside it
    out = list(explainer.explain(items_of(frames)))
    assert_same(out, reference)
    assert pool.lives[1] == 2 and explainer.stats.resubmitted >= 1
    assert (1, "shard") in pool.calls  # the restarted worker computed shards


@pytest.mark.slow  # frames through real workers
def test_a_slow_frame_holds_back_no_more_than_max_inflight_frames(make_worker, frames, reference):
    """While frame 0 is held up, the later frames that finish cannot be output: the explainer
    takes new frames only up to its in-flight bound, then waits, then completes every frame."""
    pool = HoldingPool(make_worker, 2, hold=30)
    explainer = explainer_over(pool, inflight=3)
    out = list(explainer.explain(items_of(frames)))
    assert len(pool.sent_while_held) == 3  # frame 0 and the two after it, not all six
    assert_same(out, reference)


@pytest.mark.slow  # frames through real workers
def test_pass_through_items_behind_a_slow_frame_are_bounded(make_worker, frames, reference):
    """Items without a task (``--every N``) behind a held-up frame: the input is read only as far
    as the explainer may hold items, then every item comes out in order."""
    pulled = []
    outputs_when_pulled = []
    items = items_of(frames)
    many = [items[0], *[(f"pass{i}", None) for i in range(200)], *items[1:]]

    def counted() -> Iterator[tuple[str, FrameTask | None]]:
        for item in many:
            pulled.append(item[0])
            outputs_when_pulled.append(len(out))
            yield item

    pool = HoldingPool(make_worker, 2, hold=30)
    explainer = explainer_over(pool, inflight=3)
    out: list[tuple[str, FrameResult | None]] = []
    for item in explainer.explain(counted()):
        out.append(item)
    before_first = outputs_when_pulled.count(0)  # items read before frame 0 came out
    assert before_first == max_held_items(3) < len(many)
    expected = {name: reference.get(name) for name, _ in many}
    assert_same(out, expected)


def test_all_workers_down_until_the_deadline_fails_every_run(make_worker, frames):
    def kill_all(pool: FakePool, call: _Sent) -> None:
        if len(pool.calls) == 3:
            pool.kill(0, back_after=None)
            pool.kill(1, back_after=None)

    pool = FakePool(make_worker, 2, before_call=kill_all)
    explainer = explainer_over(pool)
    with pytest.raises(ScoreCamError, match=r"^no worker is left$"):
        list(explainer.explain(items_of(frames)))
    assert pool.now > TIMEOUT  # it waited out the deadline (fake seconds), probing meanwhile
    assert all(s.state is SlotState.RESTARTING and s.probes > 0 for s in pool.slots)


@pytest.mark.slow  # frames through real workers
def test_a_shard_that_fails_every_time_names_the_frame_and_shard(make_worker, frames):
    attempts = []

    class Failing(Worker):
        def shard(self, index, x, targets, start, stop):
            if torch.equal(x, frames[2]) and start == 0:
                attempts.append(index)
                raise RuntimeError("CUDA out of memory (simulated)")
            return super().shard(index, x, targets, start, stop)

    pool = FakePool(lambda: Failing(MODEL, ENGINE), 2)
    explainer = explainer_over(pool, retries=2)
    out = []
    with pytest.raises(ScoreCamError) as err:
        for item in explainer.explain(items_of(frames)):
            out.append(item)
    assert str(err.value).startswith("frame 2: shard [0, ")
    assert str(err.value).endswith(") failed: RuntimeError: CUDA out of memory (simulated)")
    assert len(attempts) == 3  # the call and its 2 retries
    assert explainer.stats.retried == 2
    assert [p for p, _ in out] == ["frame0", "frame1", "skip"]  # the frames before it came out


def test_a_user_mistake_in_a_worker_is_not_retried(make_worker, frames):
    pool = FakePool(make_worker, 2)
    explainer = explainer_over(pool)
    bad = [("a", FrameTask(0, frames[0], (1000,)))]
    with pytest.raises(ScoreCamError, match=r"^target class 1000 is not in \[0, 1000\)$"):
        list(explainer.explain(bad))
    assert [m for _, m in pool.calls] == [] and explainer.stats.retried == 0


@pytest.mark.slow  # two runs through real workers
def test_concurrent_runs_share_the_workers(make_worker, frames, reference):
    """Two runs (e.g. two videos) from two threads at once: each gets its own frames, in order."""
    pool = FakePool(make_worker, 2)
    explainer = explainer_over(pool)
    outs: dict[str, list] = {}
    errors: list[BaseException] = []

    def run(marks: str) -> None:
        try:
            outs[marks] = list(explainer.explain(items_of(frames, marks)))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(m,)) for m in ("a:", "b:")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for marks in ("a:", "b:"):
        assert_same([(p.removeprefix(marks), r) for p, r in outs[marks]], reference)
    logits = explainer.classify(frames[:2])
    torch.testing.assert_close(logits, make_worker().classify_frames(frames[:2]))


@pytest.mark.slow  # frames and their metric passes through real workers
def test_metrics_are_one_more_call_per_frame_after_its_shards(frames, reference):
    """--metrics: each frame's summed map is scored on a worker, for its own frame and target."""
    evaluation = EvaluationConfig(metrics=True, metric_steps=4)

    def make() -> Worker:
        return Worker(MODEL, ENGINE, cache_frames=8, evaluation=evaluation)

    items = items_of(frames[:3])
    pool = FakePool(make, 2)
    policy = RetryPolicy(max_failures=2)
    explainer = ShardedExplainer(
        pool,
        pool.workers[0].meta(),
        topk=2,
        shards_per_frame=3,
        max_inflight=3,
        policy=policy,
        scoring=True,
    )
    out = list(explainer.explain(items))
    assert_same(out, {payload: reference[payload] for payload, _ in items})
    scorer = make()
    for (_, task), (_, result) in zip(items, out, strict=True):
        if task is None:
            continue
        # The scores of this frame's map, not of another frame's: a shard-summed map can rank
        # near-tied pixels otherwise than the in-process one, so the maps given are compared.
        expected = scorer.score(task.x, result.maps[0], int(result.targets[0]))
        assert result.scores is not None
        assert result.scores.fields == pytest.approx(expected.fields, rel=1e-6, abs=1e-7)
    methods = [m for _, m in pool.calls]
    assert methods.count("score") == 3 and explainer.stats.calls == 3 * 5


# ---------------------------------------------------------------------- the pure policy


def test_workers_up_counts_the_workers_taking_calls(make_worker):
    """What ``scorecam_workers_alive`` shows: neither restarting nor gone."""
    pool = FakePool(make_worker, 3)
    explainer = explainer_over(pool)
    assert explainer.workers_up() == 3
    pool.slots[0].state, pool.slots[2].state = SlotState.RESTARTING, SlotState.GONE
    assert explainer.workers_up() == 1


def test_slot_probe_back_off_then_gone_after_repeated_dead_probes():
    slot = Slot(0)
    assert slot.lost(10.0) and not slot.lost(11.0)  # only the first death counts
    assert slot.state is SlotState.RESTARTING and slot.probe_at == pytest.approx(10.2)
    delays = []
    now = 10.2
    while True:
        gone = slot.probe_failed(now, dead=True)
        if gone:
            break
        delays.append(round(slot.probe_at - now, 3))
        now = slot.probe_at
    assert delays == [0.5, 1.0, 1.0, 1.0]  # growing pauses, then steady
    assert slot.state is SlotState.GONE and slot.probe_at is None
    restarting = Slot(1)
    restarting.lost(0.0)
    for i in range(20):  # "still restarting" answers never give it up
        assert not restarting.probe_failed(float(i), dead=False)
    restarting.back("pid 2 on host")
    assert restarting.state is SlotState.UP and restarting.probes == 0
    failed_init = Slot(2)
    failed_init.lost(0.0)
    assert failed_init.probe_failed(0.2, dead=True, for_good=True)


def test_pick_slot_prefers_then_least_busy_and_skips_workers_down():
    a, b, c = Slot(0, busy=1, sent=5), Slot(1, busy=1, sent=2), Slot(2)
    c.lost(0.0)
    assert pick_slot([a, b, c]) is b  # equal busy: the least used; c is down
    assert pick_slot([a, b, c], prefer=a) is a
    a.busy = b.busy = 2
    assert pick_slot([a, b, c], prefer=a) is None  # no room anywhere


def test_none_left_waits_for_the_deadline_unless_all_are_gone():
    a, b = Slot(0), Slot(1)
    assert not none_left([a, b], 0.0, 10.0)
    a.lost(0.0)
    b.lost(5.0)
    assert not none_left([a, b], 14.0, 10.0) and none_left([a, b], 15.5, 10.0)
    a.probe_failed(1.0, dead=True, for_good=True)
    b.probe_failed(1.0, dead=True, for_good=True)
    assert none_left([a, b], 6.0, 10.0)  # all gone for good: no need to wait
    assert probes_due([a, b], 100.0) == ([], None)


@pytest.mark.parametrize(
    ("failure", "failures", "losses", "retry"),
    [
        (Failure("oom", lost=False), 2, 0, True),
        (Failure("oom", lost=False), 3, 0, False),
        (Failure("bad class", lost=False, retryable=False), 1, 0, False),
        (Failure("died", lost=True), 0, 4, True),
        (Failure("died", lost=True), 0, 5, False),
    ],
)
def test_retry_policy(failure, failures, losses, retry):
    assert RetryPolicy(max_failures=2).retry(failures, losses, failure) is retry


# --- temporal reuse (--fidelity below 1): the driver keeps the stream's state ------------------

REUSE_MODEL = ModelConfig(spec="efficientnet_lite0", input_size=48, layer="blocks.2")
REUSE = ReuseOptions(fidelity=0.5, keyframe_interval=3)


def drifting_items(count: int) -> list[tuple[int, FrameTask]]:
    """One scene drifting a little each frame."""
    x = seeded_frames(1, 48, seed=3)[0]
    g = torch.Generator().manual_seed(3)
    frames = []
    for _ in range(count):
        frames.append(x)
        x = x + 0.04 * torch.randn(x.shape, generator=g)
    return [(i, FrameTask(i, f)) for i, f in enumerate(frames)]


@pytest.mark.parametrize("kill", [False, True])
def test_reuse_over_the_pool_equals_in_process(kill):
    def make() -> Worker:
        return Worker(REUSE_MODEL, EngineConfig(batch_size=8), cache_frames=8)

    items = drifting_items(8)
    local = list(LocalExplainer(make(), topk=2).explain(items, REUSE))

    def kill_once(pool: FakePool, call: _Sent) -> None:
        if kill and call.method == "channel_logits" and pool.lives[1] == 1:
            pool.kill(1, back_after=2)

    pool = FakePool(make, 2, before_call=kill_once)
    policy = RetryPolicy(max_failures=2)
    explainer = ShardedExplainer(
        pool, pool.workers[0].meta(), topk=2, shards_per_frame=3, max_inflight=3, policy=policy
    )
    out = list(explainer.explain(items, REUSE))
    assert [p for p, _ in out] == [p for p, _ in local]  # every frame, in order
    for (_, a), (_, b) in zip(local, out, strict=True):
        assert a is not None and b is not None
        assert b.maps.shape[0] == 2  # --topk 2: both classes' maps from one set of passes
        np.testing.assert_array_equal(a.targets, b.targets)
        np.testing.assert_allclose(b.maps, a.maps, rtol=1e-5, atol=1e-6)
        assert (a.passes, a.reused, a.keyframe) == (b.passes, b.reused, b.keyframe)
        assert (a.fidelity is None) == (b.fidelity is None)
    assert [r.keyframe for _, r in out] == [True, False, False, True, False, False, True, False]
    methods = [m for _, m in pool.calls]
    assert "shard" not in methods and "targets_and_passes" not in methods  # the reuse protocol only
    # Only the planned channels travel: as many passes were asked of the workers as run.
    assert methods.count("view") >= len(items)
    if kill:
        assert explainer.stats.resubmitted >= 1


# --- concurrent live streams: served in turn ---------------------------------------------------

CHANNELS, SIZE = 16, 4


class InstantWorker:
    """Stands for a Worker where only the order of calls matters: constant answers, no model."""

    def meta(self) -> ModelMeta:
        return ModelMeta("instant", "layer", SIZE, (0.0,) * 3, (1.0,) * 3, ())

    def targets_and_passes(self, key, x, fixed, topk):
        return torch.tensor([0]), torch.tensor([1.0]), torch.ones(CHANNELS, dtype=torch.bool)

    def shard(self, key, x, targets, start, stop):
        partial = torch.full((1, 1, SIZE, SIZE), float(stop - start))  # (N, T, S, S)
        return ShardResult(start, stop, partial, None, torch.zeros(1, dtype=torch.int64))


@dataclass(eq=False)
class LockstepPool(FakePool):
    """A FakePool that answers only once every stream has a frame in flight (and its calls
    queued or sent): as on real workers, where a frame's calls take far longer than a stream
    takes to hand over its next frame. Thread timing then decides nothing the test counts."""

    explainer: ShardedExplainer | None = None
    streams: int = 2
    stop: threading.Event = field(default_factory=threading.Event)

    def poll(self, timeout: float) -> list[Reply]:
        explainer = self.explainer
        assert explainer is not None
        # Under the explainer's lock, as a run's frame is admitted and queued under it; nothing
        # notifies on admission, so the lock is let go in short waits.
        deadline = time.monotonic() + 30
        with explainer._cond:
            while not (self.stop.is_set() or self._all_busy()):
                assert time.monotonic() < deadline, "a stream never handed over its next frame"
                explainer._cond.wait(0.001)
            explainer._dispatch()  # what its threads would send before this poll, in queue order
        # Each worker runs one call at a time, in the order they were sent to it.
        running: list[_Sent] = []
        waiting: list[_Sent] = []
        for call in self.sent:
            (waiting if any(r.slot is call.slot for r in running) else running).append(call)
        self.sent = running
        replies = super().poll(timeout)
        self.sent = waiting + self.sent
        return replies

    def _all_busy(self) -> bool:
        runs = self.explainer._runs
        # A frame in flight whose result is not out yet: in the tracker, not in the buffer.
        return len(runs) == self.streams and all(len(r.tracker) > len(r.buffer) for r in runs)


def frames_done_by_two_live_streams(fair: bool, total: int = 60) -> list[int]:
    """Return how many frames each of two live streams (one frame in flight each, the next asked
    for as soon as a map is out) had explained when they had ``total`` between them."""
    pool = LockstepPool(InstantWorker, 2)
    explainer = ShardedExplainer(
        pool,
        pool.workers[0].meta(),
        # Far more calls than the 2 workers take at once (2 each), so the queue's order decides
        # who goes next. (With as few shards as workers, two streams never wait for each other.)
        shards_per_frame=CHANNELS,
        max_inflight=1,
        policy=RetryPolicy(),
        fair=fair,
    )
    pool.explainer = explainer
    done = [0, 0]
    at_total: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        def frames() -> Iterator[tuple[int, FrameTask]]:
            seq = 0
            while not pool.stop.is_set():
                yield seq, FrameTask(seq, torch.zeros(3, SIZE, SIZE))
                seq += 1

        try:
            for seq, result in explainer.explain(frames()):
                # Its own frames, in order, each map the sum of all its shards.
                assert result is not None and result.index == seq
                assert (result.maps == CHANNELS).all()
                with lock:
                    done[i] += 1
                    if sum(done) == total:
                        at_total.extend(done)
                        pool.stop.set()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)
            pool.stop.set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    return at_total


def test_live_streams_sharing_the_workers_take_turns():
    """Fair order (RayExplainer(live=True)): neither stream starves the other."""
    done = frames_done_by_two_live_streams(fair=True)
    assert min(done) * 3 >= max(done), done


def test_oldest_run_first_lets_one_live_stream_starve_the_other():
    """What the fair order is for: by the batch order, the first stream takes most turns."""
    done = frames_done_by_two_live_streams(fair=False)
    assert min(done) * 2 <= max(done), done  # 3 to 1 here
