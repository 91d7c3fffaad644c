"""Ray workers for the masked passes: cluster connection, actors, dispatch, retries.

The only module that imports ray. :class:`RayExplainer` gives the pipeline what
:class:`~scorecam_stream.workers.LocalExplainer` gives it (per-frame results in input order), with
the masked passes of every frame split into channel shards spread over Ray actors, each actor a
:class:`~scorecam_stream.workers.Worker` holding one model replica on one device.

Per frame: one worker classifies it (its base pass is cached there) and the targets are fixed
once; the channel range is split by :func:`~scorecam_stream.scheduler.balanced_ranges` into
shards of equal work (constant channels cost no pass); every shard goes to whichever worker has
room (the classifying worker gets one of them, its base pass is ready); the partials are summed
in shard order. Several frames are in flight, within a bound, so no worker idles between frames
and memory stays flat for any video length.

Faults: a worker that dies is restarted by Ray (``max_restarts``) while its unfinished calls go
to the other workers; an exception inside a call is retried ``max_shard_retries`` times, then
raises :class:`~scorecam_stream.errors.ScoreCamError` naming the frame and shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    AuthenticationError,
    GetTimeoutError,
    RayActorError,
    RayTaskError,
)

from .config import DistributedConfig, EngineConfig, EvaluationConfig, ModelConfig
from .errors import ScoreCamError, first_line
from .evaluation import FrameScores
from .scheduler import (
    InflightTracker,
    ReorderBuffer,
    balanced_ranges,
    default_max_inflight,
    default_shards_per_frame,
    max_held_items,
    plan_actor_resources,
)
from .scorecam import ShardResult, combine_shards
from .workers import FrameResult, FrameTask, ModelMeta, P, Worker, make_result, targets_for

log = logging.getLogger(__name__)

CALLS_PER_WORKER = 2  # outstanding calls per actor: one running, the next already queued there
WORKER_MAX_RESTARTS = 5  # Ray restarts a dead actor this often, then it is gone for good
MAX_WORKER_LOSSES = 4  # a call whose worker died this often is suspected of killing it
SCORE_CALL = -2  # _Call.shard of a frame's metric passes (--metrics); -1 is its classification
MAX_PROBE_FAILURES = 5  # "are you back?" calls that found it dead before it is given up
_POLL_S = 1.0  # longest single wait, so that deadlines are checked
_PROBE_DELAYS = (0.2, 0.5, 1.0)  # seconds between "are you back?" calls while it is restarting
_CONNECT_CHECK_S = 10.0  # ray.init retries an unreachable address for minutes: look first
_AUTH_HINT = (
    "with token authentication on the cluster, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to "
    "the token `ray get-auth-token` prints on its head node"
)


@dataclass
class DispatchStats:
    """Counts of one explainer's actor calls (for logs and tests)."""

    calls: int = 0  # actor calls sent, every resend included
    retried: int = 0  # calls sent again after an exception inside the worker
    resubmitted: int = 0  # calls sent again after their worker died
    restarts: int = 0  # workers that came back after dying


@dataclass(eq=False)
class _Slot:
    """One actor and what the driver knows of it."""

    index: int
    actor: Any  # ray ActorHandle
    pid: int | None = None
    busy: int = 0  # calls sent and not yet collected
    sent: int = 0
    up: bool = True
    gone: bool = False  # dead for good (restarts exhausted, or it keeps failing to come back)
    down_since: float | None = None
    probe_at: float | None = None  # when to ask a dead worker whether it is back
    probes: int = 0  # "are you back?" calls that failed since it died
    probe_failures: int = 0  # of those, the ones that found it dead (not restarting)


@dataclass(eq=False)
class _Frame:
    """A frame in flight on the driver."""

    seq: int  # position in the input (order of output)
    key: int  # the workers' cache key: unique for the life of the explainer
    task: FrameTask
    payload: Any
    x_ref: Any  # ObjectRef of task.x, put once and passed to every call
    began: float | None = None
    logits: torch.Tensor | None = None  # (C,)
    targets: torch.Tensor | None = None  # (T,)
    result: FrameResult | None = None  # --metrics: the maps, waiting for their scores


@dataclass(eq=False)
class _Run:
    """The state of one ``explain`` call."""

    tracker: InflightTracker[ShardResult]
    max_held: int
    buffer: ReorderBuffer[tuple[Any, FrameResult | None]] = field(default_factory=ReorderBuffer)
    frames: dict[int, _Frame] = field(default_factory=dict)
    pending: list[tuple[int, int, int, _Call]] = field(default_factory=list)  # heap
    preferred: list[_Call] = field(default_factory=list)
    next_seq: int = 0
    closed: bool = False  # abandoned: its calls still in flight are only collected


@dataclass(eq=False)
class _Call:
    """One actor call: a frame's classification (``shard == -1``) or one of its shards."""

    run: _Run
    frame: _Frame
    shard: int
    start: int = 0
    stop: int = 0
    prefer: _Slot | None = None
    failures: int = 0  # exceptions raised inside the worker
    losses: int = 0  # times its worker died under it

    def describe(self) -> str:
        if self.shard == SCORE_CALL:
            return f"frame {self.frame.task.index}: metrics"
        if self.shard < 0:
            return f"frame {self.frame.task.index}: classification"
        return f"frame {self.frame.task.index}: shard [{self.start}, {self.stop})"


class RayExplainer:
    """Explains frames with Ray actors, each frame's channels split into shards over them.

    ``RayExplainer(model, engine, dist, topk)`` connects to the cluster at ``dist.address`` (or
    starts a local Ray instance, or reuses the one this process already initialised), starts
    ``dist.gpus`` GPU workers or ``dist.workers`` CPU workers and waits for them. Use it as a
    context manager or call :meth:`close`.

    ``meta`` is the model's preprocessing and class names, as the workers loaded it.
    ``worker_cls`` is the class each actor holds: :class:`Worker` or a subclass of it.
    """

    meta: ModelMeta

    def __init__(
        self,
        model: ModelConfig,
        engine: EngineConfig,
        dist: DistributedConfig,
        topk: int = 1,
        *,
        worker_cls: type[Worker] = Worker,
        evaluation: EvaluationConfig | None = None,
    ) -> None:
        if topk < 1:
            raise ScoreCamError(f"--topk must be >= 1, got {topk}")
        self.model = model
        self.engine = engine
        self.dist = dist
        self.topk = topk
        # --metrics: each frame's metric passes run on a worker too, after its shards.
        self.evaluation = evaluation if evaluation is not None and evaluation.enabled else None
        self.num_workers = dist.num_workers
        self.shards_per_frame = dist.shards_per_frame or default_shards_per_frame(self.num_workers)
        self.max_inflight = dist.max_inflight_frames or default_max_inflight(self.num_workers)
        self.stats = DispatchStats()
        self._closed = False
        self._owns_ray = False  # this object called ray.init, so close() calls ray.shutdown
        self._running = False
        self._slots: list[_Slot] = []
        self._inflight: dict[Any, tuple[_Call, _Slot]] = {}  # ObjectRef -> call
        self._probes: dict[Any, _Slot] = {}  # ObjectRef of info() -> worker coming back
        self._keys = itertools.count()
        self._order = itertools.count()  # tie-breaker of the pending heap
        try:
            self._connect()
            self._start_workers(worker_cls)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ public API

    def __enter__(self) -> RayExplainer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def actors(self) -> list[Any]:
        """Return the workers' actor handles."""
        return [slot.actor for slot in self._slots]

    def worker_info(self) -> list[dict[str, object]]:
        """Return each worker's host, pid, device and threads (waits for restarting ones)."""
        self._check_open()
        deadline = time.monotonic() + self.dist.startup_timeout
        infos = []
        for slot in self._slots:
            while True:
                try:
                    infos.append(ray.get(slot.actor.info.remote()))
                    break
                except ActorUnavailableError:  # restarting: Ray refuses calls for a moment
                    if time.monotonic() > deadline:
                        raise ScoreCamError(
                            f"Ray worker {slot.index} did not come back within "
                            f"{self.dist.startup_timeout:g} s"
                        ) from None
                    time.sleep(_PROBE_DELAYS[0])
                except RayActorError as err:
                    raise ScoreCamError(f"Ray worker {slot.index} is gone: {_cause(err)}") from None
        return infos

    def classify(self, xs: torch.Tensor) -> torch.Tensor:
        """Return the logits (N, C) on CPU of model inputs ``xs`` (N, 3, S, S), on one worker."""
        self._check_open()
        failures = losses = 0
        while True:
            slot = self._await_worker()
            slot.sent += 1
            self.stats.calls += 1
            try:
                return ray.get(slot.actor.classify_batch.remote(xs))
            except RayActorError as err:
                losses += 1
                self._worker_lost(slot, err)
                if losses > MAX_WORKER_LOSSES:
                    raise ScoreCamError(
                        f"classification of {len(xs)} frames failed: its worker died {losses} "
                        f"times ({_cause(err)})"
                    ) from None
            except RayTaskError as err:
                failures += 1
                if failures > self.dist.max_shard_retries:
                    raise ScoreCamError(
                        f"classification of {len(xs)} frames failed: {_cause(err)}"
                    ) from None
                self.stats.retried += 1
                log.warning(
                    "classification failed (%s); retry %d of %d",
                    _cause(err),
                    failures,
                    self.dist.max_shard_retries,
                )

    def explain(
        self, items: Iterable[tuple[P, FrameTask | None]]
    ) -> Iterator[tuple[P, FrameResult | None]]:
        """Yield (payload, result) in the order of ``items``; a None task passes through.

        Items are pulled lazily, only while fewer than ``max_inflight`` frames are in flight.
        """
        self._check_open()
        if self._running:
            raise RuntimeError("explain is already running on this explainer")
        self._running = True
        run = _Run(InflightTracker(self.max_inflight), max_held_items(self.max_inflight))
        inputs = iter(items)
        exhausted = False
        frames = 0
        began = time.perf_counter()
        try:
            while True:
                if not exhausted:
                    exhausted = self._admit(run, inputs)
                self._dispatch(run)
                seq = run.buffer.next_index
                out = run.buffer.pop()
                if out is not None:
                    if out[1] is not None:
                        run.tracker.release(seq)
                        frames += 1
                    yield out
                    continue
                if exhausted and not len(run.tracker):
                    break
                self._poll()
            log.info(
                "explained %d frames in %.1f s (%s)",
                frames,
                time.perf_counter() - began,
                self.stats,
            )
        finally:
            # Abandoned (error, KeyboardInterrupt, consumer stopped): calls still in flight are
            # only collected from now on, so that their workers' slots come free.
            run.closed = True
            self._running = False

    def close(self) -> None:
        """Kill the workers; shut down the Ray instance if this object started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        slots, self._slots = self._slots, []
        self._inflight.clear()
        self._probes.clear()
        if not ray.is_initialized():
            return
        for slot in slots:
            try:
                ray.kill(slot.actor)  # no_restart=True: Ray does not bring it back
            except Exception as err:  # already dead, or the cluster went away: nothing to free
                log.debug("could not kill worker %d: %s", slot.index, err)
        if self._owns_ray:
            ray.shutdown()
        log.info("closed %d Ray workers", len(slots))

    # ------------------------------------------------------------------ start-up

    def _connect(self) -> None:
        if ray.is_initialized():
            log.info("using the Ray instance this process already initialised")
            return
        address = self.dist.address
        quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if address:
            _check_reachable(address, min(_CONNECT_CHECK_S, self.dist.startup_timeout))
            # A ray:// client passes its keyword arguments to the server's ray.init: pass none.
            kwargs = {} if address.startswith("ray://") else quiet
            try:
                with _keep_sigterm_handler():
                    ray.init(address=address, **kwargs)
            except AuthenticationError as err:
                raise ScoreCamError(
                    f"the Ray cluster at {address} refused this process ({first_line(err)}); "
                    f"{_AUTH_HINT}"
                ) from None
            except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
                raise ScoreCamError(
                    f"cannot connect to the Ray cluster at {address}: {first_line(err)}; "
                    f"{_AUTH_HINT}"
                ) from None
            log.info("connected to the Ray cluster at %s", address)
        else:
            # address="local": a new instance, whatever RAY_ADDRESS or an earlier `ray start` say.
            cpus = max(os.cpu_count() or 1, self.dist.workers)
            # A private instance: Ray's own start-up notices (e.g. its token set-up) say nothing
            # the user can act on, so only its errors are shown.
            quiet["logging_level"] = logging.ERROR
            with _keep_sigterm_handler():
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
            log.info("started a local Ray instance with %d CPUs", cpus)
            self._watch_local_raylet()
        self._owns_ray = True  # a connection is only ended by ray.shutdown, never the cluster

    def _watch_local_raylet(self) -> None:
        """Say in one line when the local instance's raylet dies (e.g. the OOM killer).

        Ray then ends this process itself, from a C++ thread, with only its own messages and
        no Python clean-up (the outputs, having no name yet, vanish with it). A thread woken
        by the raylet's pidfd gets the line out first.
        """
        try:
            node = ray._private.worker.global_worker.node
            pid = node.all_processes["raylet"][0].process.pid
            pidfd = os.pidfd_open(pid)
        except (AttributeError, KeyError, IndexError, OSError) as err:  # private API, Linux only
            log.debug("not watching the local raylet: %s", err)
            return

        def watch() -> None:
            select.select([pidfd], [], [])
            if not self._closed:
                log.error(
                    "the local Ray instance was lost (its raylet, pid %d, died); no output written",
                    pid,
                )
            os.close(pidfd)

        threading.Thread(target=watch, daemon=True, name="raylet-watch").start()

    def _start_workers(self, worker_cls: type[Worker]) -> None:
        n = self.num_workers
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        model = self.model
        on_gpu = model.device.startswith("cuda")
        plan = plan_actor_resources(
            on_gpu=on_gpu,
            gpus=self.dist.gpus,
            workers_per_gpu=self.dist.workers_per_gpu,
            workers=self.dist.workers,
            cluster_cpus=cpus,
            threads_per_worker=self.dist.threads_per_worker,
        )
        if on_gpu:
            asked = f"--gpus {n}" if self.dist.gpus else f"{n} worker(s) on --device cuda"
            if self.dist.workers_per_gpu > 1:
                asked = f"--gpus {self.dist.gpus} --workers-per-gpu {self.dist.workers_per_gpu}"
            if gpus < plan.gpus_needed:
                instead = f"--gpus {gpus}" if gpus else f"--workers {n} --device cpu"
                raise ScoreCamError(f"{asked}: the Ray cluster has {gpus} GPU(s); use {instead}")
            # Ray makes each actor's GPU visible to it as cuda:0 (shared with K-1 others).
            model = dataclasses.replace(model, device="cuda")
        options: dict[str, Any] = plan.options()
        threads = plan.threads
        options["max_restarts"] = WORKER_MAX_RESTARTS
        remote_cls = ray.remote(**options)(worker_cls)
        # Enough cached base passes that frames still in flight are never evicted.
        cache_frames = max(16, self.max_inflight + 4)
        self._slots = [
            _Slot(i, remote_cls.remote(model, self.engine, threads, cache_frames, self.evaluation))
            for i in range(n)
        ]
        log.info("starting %d Ray workers (%s, %s threads each)", n, options, threads or "default")
        waiting = {slot.actor.info.remote(): slot for slot in self._slots}
        deadline = time.monotonic() + self.dist.startup_timeout
        while waiting:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=max(0.0, left))
            if not ready:
                raise ScoreCamError(
                    f"{len(waiting)} of {n} Ray workers did not start within "
                    f"{self.dist.startup_timeout:g} s (the cluster has {cpus} CPUs and {gpus} "
                    f"GPUs, each worker needs {_needs(options)}): ask for fewer workers or raise "
                    f"--startup-timeout"
                )
            slot = waiting.pop(ready[0])
            try:
                info = ray.get(ready[0])
            except (RayActorError, RayTaskError) as err:
                raise ScoreCamError(f"a Ray worker failed to start: {_cause(err)}") from None
            slot.pid = info["pid"]
            log.info(
                "worker %d: pid %s on %s, %s, %s threads",
                slot.index,
                info["pid"],
                info["host"],
                info["device"],
                info["threads"],
            )
        try:
            left = max(1.0, deadline - time.monotonic())
            self.meta = ray.get(self._slots[0].actor.meta.remote(), timeout=left)
        except (RayActorError, GetTimeoutError) as err:
            raise ScoreCamError(f"a Ray worker failed to start: {_cause(err)}") from None

    # ------------------------------------------------------------------ dispatch

    def _admit(self, run: _Run, inputs: Iterator[tuple[Any, FrameTask | None]]) -> bool:
        """Pull items while there is room; return whether the input is exhausted."""
        while not run.tracker.full and run.next_seq - run.buffer.next_index < run.max_held:
            try:
                payload, task = next(inputs)
            except StopIteration:
                return True
            seq = run.next_seq
            run.next_seq += 1
            if task is None:
                run.buffer.push(seq, (payload, None))
                continue
            run.tracker.admit(seq)
            frame = _Frame(seq, next(self._keys), task, payload, ray.put(task.x))
            run.frames[seq] = frame
            self._queue(_Call(run, frame, shard=-1))
        return False

    def _queue(self, call: _Call) -> None:
        if call.prefer is not None:
            call.run.preferred.append(call)
        else:
            heapq.heappush(call.run.pending, (call.frame.seq, call.shard, next(self._order), call))

    def _dispatch(self, run: _Run) -> None:
        """Send queued calls, oldest frame first, to the workers that have room."""
        preferred, run.preferred = run.preferred, []
        for call in preferred:
            slot, call.prefer = call.prefer, None
            if slot is not None and slot.up and slot.busy < CALLS_PER_WORKER:
                self._send(call, slot)
            else:
                self._queue(call)
        while run.pending:
            free = [s for s in self._slots if s.up and s.busy < CALLS_PER_WORKER]
            if not free:
                return
            call = heapq.heappop(run.pending)[-1]
            self._send(call, min(free, key=lambda s: (s.busy, s.sent)))

    def _send(self, call: _Call, slot: _Slot) -> None:
        frame = call.frame
        if call.shard == SCORE_CALL:
            assert frame.result is not None
            result = frame.result
            ref = slot.actor.score.remote(frame.x_ref, result.maps[0], int(result.targets[0]))
        elif call.shard < 0:
            ref = slot.actor.classify.remote(frame.key, frame.x_ref)
        else:
            ref = slot.actor.shard.remote(
                frame.key, frame.x_ref, frame.targets, call.start, call.stop
            )
        if frame.began is None:
            frame.began = time.perf_counter()
        slot.busy += 1
        slot.sent += 1
        self.stats.calls += 1
        self._inflight[ref] = (call, slot)

    # ------------------------------------------------------------------ collection

    def _poll(self) -> None:
        """Wait for calls or probes to come back and handle every one that has."""
        wait_s = self._send_due_probes()
        refs = list(self._inflight) + list(self._probes)
        if not refs:
            if wait_s is None:
                raise ScoreCamError(self._no_worker_message())
            time.sleep(wait_s)
            self._check_down_deadline()
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if not ready:
            timeout = _POLL_S if wait_s is None else wait_s
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        for ref in ready:
            if ref in self._probes:
                self._probe_back(ref)
            else:
                self._collect(ref)
        if not any(s.up for s in self._slots):
            self._check_down_deadline()

    def _collect(self, ref: Any) -> None:
        call, slot = self._inflight.pop(ref)
        slot.busy -= 1
        try:
            value = ray.get(ref)
        except RayActorError as err:
            self._worker_lost(slot, err)
            if not call.run.closed:
                self._resend_lost(call, err)
            return
        except RayTaskError as err:
            if not call.run.closed:
                self._retry_failed(call, err)
            return
        if call.run.closed:
            return
        if call.shard == SCORE_CALL:
            self._scored(call.run, call.frame, value)
        elif call.shard < 0:
            self._classified(call, slot, value)
        elif call.run.tracker.done(call.frame.seq, call.shard, value):
            self._frame_done(call.run, call.frame)

    def _classified(
        self, call: _Call, slot: _Slot, value: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        logits, passes = value
        frame = call.frame
        frame.logits = logits
        frame.targets = self._targets(frame.task, logits)
        # Shards of equal work, not of equal length: constant channels cost no pass.
        ranges = balanced_ranges(passes.int().tolist(), self.shards_per_frame)
        call.run.tracker.plan(frame.seq, ranges)
        for shard, (start, stop) in enumerate(ranges):
            # The classifying worker holds this frame's base pass: give it the first shard.
            self._queue(
                _Call(call.run, frame, shard, start, stop, prefer=slot if shard == 0 else None)
            )

    def _targets(self, task: FrameTask, logits: torch.Tensor) -> torch.Tensor:
        classes = logits.shape[0]
        if task.targets is None and self.topk > classes:
            raise ScoreCamError(f"--topk {self.topk} is more than the model's {classes} classes")
        targets = targets_for(logits, task.targets, self.topk)
        bad = [t for t in targets.tolist() if not 0 <= t < classes]
        if bad:
            raise ScoreCamError(
                f"frame {task.index}: target class {bad[0]} is not in [0, {classes})"
            )
        return targets

    def _frame_done(self, run: _Run, frame: _Frame) -> None:
        partials = run.tracker.take_partials(frame.seq)
        maps = combine_shards(partials)[0]  # (T, S, S)
        skipped = sum(int(p.skipped[0]) for p in partials)
        assert frame.logits is not None and frame.targets is not None and frame.began is not None
        result = make_result(
            frame.task.index,
            maps,
            frame.targets,
            frame.logits,
            skipped,
            time.perf_counter() - frame.began,
        )
        if self.evaluation is not None:  # its metric passes first, on whichever worker is free
            frame.result = result
            self._queue(_Call(run, frame, SCORE_CALL))
            return
        run.buffer.push(frame.seq, (frame.payload, result))
        del run.frames[frame.seq]  # drops the frame's model input from the object store

    def _scored(self, run: _Run, frame: _Frame, scores: FrameScores) -> None:
        assert frame.result is not None
        run.buffer.push(
            frame.seq, (frame.payload, dataclasses.replace(frame.result, scores=scores))
        )
        del run.frames[frame.seq]

    # ------------------------------------------------------------------ faults

    def _retry_failed(self, call: _Call, err: RayTaskError) -> None:
        """An exception inside the worker (CUDA OOM, a bad input): retry, then give up."""
        call.failures += 1
        cause = _cause(err)
        if call.failures > self.dist.max_shard_retries:
            raise ScoreCamError(f"{call.describe()} failed: {cause}") from None
        self.stats.retried += 1
        log.warning(
            "%s failed (%s); retry %d of %d",
            call.describe(),
            cause,
            call.failures,
            self.dist.max_shard_retries,
        )
        self._queue(call)

    def _resend_lost(self, call: _Call, err: RayActorError) -> None:
        call.losses += 1
        if call.losses > MAX_WORKER_LOSSES:
            raise ScoreCamError(
                f"{call.describe()} failed: its worker died {call.losses} times ({_cause(err)})"
            ) from None
        self.stats.resubmitted += 1
        self._queue(call)

    def _worker_lost(self, slot: _Slot, err: RayActorError) -> None:
        """Stop sending to a dead worker; ask it (through Ray's restart) to report back."""
        if not slot.up or slot.gone:
            return
        slot.up = False
        slot.down_since = time.monotonic()
        log.warning(
            "worker %d (pid %s) died: %s; its calls go to the other workers",
            slot.index,
            slot.pid,
            first_line(err),
        )
        self._probe(slot)

    def _probe(self, slot: _Slot) -> None:
        """Ask a dead worker whether it is back, after a pause that grows with each try."""
        delay = _PROBE_DELAYS[min(slot.probes, len(_PROBE_DELAYS) - 1)]
        slot.probe_at = time.monotonic() + delay

    def _send_due_probes(self) -> float | None:
        """Send the probes that are due; return the seconds until the next one (None: none)."""
        now = time.monotonic()
        waits = []
        for slot in self._slots:
            if slot.probe_at is None:
                continue
            if slot.probe_at <= now:
                # Ray holds it while the actor restarts, or refuses it (ActorUnavailableError).
                slot.probe_at = None
                self._probes[slot.actor.info.remote()] = slot
            else:
                waits.append(slot.probe_at - now)
        return min(waits) if waits else None

    def _probe_back(self, ref: Any) -> None:
        slot = self._probes.pop(ref)
        try:
            info = ray.get(ref)
        except (RayActorError, RayTaskError) as err:
            slot.probes += 1
            if not isinstance(err, ActorUnavailableError):  # not restarting: dead
                slot.probe_failures += 1
            init_failed = isinstance(err, ActorDiedError) and err.actor_init_failed
            if init_failed or slot.probe_failures >= MAX_PROBE_FAILURES:
                slot.gone = True
                log.warning("worker %d is gone: %s", slot.index, _cause(err))
                if all(s.gone for s in self._slots):
                    raise ScoreCamError(f"every Ray worker died: {_cause(err)}") from None
            else:
                self._probe(slot)
            return
        slot.up, slot.pid = True, info["pid"]
        slot.probes = slot.probe_failures = 0
        self.stats.restarts += 1
        log.info("worker %d is back: pid %s on %s", slot.index, info["pid"], info["host"])

    def _check_down_deadline(self) -> None:
        """Raise when no worker has been up for ``startup_timeout`` seconds."""
        last = max((s.down_since or 0.0) for s in self._slots) if self._slots else 0.0
        if time.monotonic() - last > self.dist.startup_timeout:
            raise ScoreCamError(self._no_worker_message())

    def _no_worker_message(self) -> str:
        return (
            f"no Ray worker is left: all {len(self._slots)} died and none came back within "
            f"{self.dist.startup_timeout:g} s"
        )

    def _await_worker(self) -> _Slot:
        """Return the least busy worker that is up, waiting for one to come back if need be."""
        while True:
            up = [s for s in self._slots if s.up]
            if up:
                return min(up, key=lambda s: (s.busy, s.sent))
            self._poll()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the explainer is closed")


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """Put back a SIGTERM handler that ray.init replaces (with ``sys.exit``).

    The command line turns SIGTERM into :class:`~scorecam_stream.errors.Terminated`, which every
    clean-up handles like Ctrl-C; without a handler of its own, Ray's stays.
    """
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def _check_reachable(address: str, timeout: float) -> None:
    """Raise ScoreCamError when nothing listens at a HOST:PORT or ray://HOST:PORT address."""
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://").rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ScoreCamError(
            f"--address must be auto, HOST:PORT or ray://HOST:PORT, got '{address}'"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ScoreCamError(
            f"cannot connect to the Ray cluster at {address}: {err.strerror or err}"
        ) from None


def _needs(options: dict[str, Any]) -> str:
    names = {"num_cpus": "CPU", "num_gpus": "GPU"}
    return " and ".join(f"{options[k]} {name}" for k, name in names.items() if k in options)


def _cause(err: BaseException) -> str:
    """Return the one-line cause of a Ray error: the worker's own exception where there is one."""
    if isinstance(err, RayTaskError) and err.cause is not None:
        cause = err.cause
        if isinstance(cause, ScoreCamError):
            return first_line(cause)
        return f"{type(cause).__name__}: {first_line(cause)}"
    if isinstance(err, RayActorError) and err.actor_init_failed:
        # The creation task's traceback is in the message; its last line is the exception.
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else type(err).__name__
        name, sep, message = last.partition(": ")
        if sep and name.rsplit(".", 1)[-1] == ScoreCamError.__name__:
            return message
        return f"{name.rsplit('.', 1)[-1]}: {message}" if sep else last
    return first_line(err)
