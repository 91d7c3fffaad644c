"""A pool of Ray actors that knows nothing of frames: start-up, calls, deaths, restarts.

Each actor holds one worker (a plain class, e.g. :class:`~scorecam_stream.workers.Worker`) and
has a :class:`~scorecam_stream.scheduler.Slot`: the driver's view of it (up, restarting, gone;
calls in flight). :meth:`ActorPool.submit` sends a method call tagged by the caller;
:meth:`ActorPool.poll` returns the calls that came back, as values or as a
:class:`~scorecam_stream.scheduler.Failure` (an exception inside the call, or the worker lost).
A worker that dies is restarted by Ray (``max_restarts``) and probed until it answers again;
the decisions (when to probe, when it is gone, when the pool has given up) are the pure
functions of :mod:`~scorecam_stream.scheduler`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
)

from ..errors import ScoreCamError, first_line
from ..scheduler.health import Failure, Slot, none_left, pick_slot, probes_due
from .session import node_table

log = logging.getLogger(__name__)

WORKER_MAX_RESTARTS = 5  # Ray restarts a dead actor this often, then it is gone for good
_POLL_S = 1.0  # longest single wait, so that deadlines are checked


@dataclass(frozen=True)
class Reply:
    """A call that came back: its tag, its worker, and either its value or why it failed."""

    tag: Any
    slot: Slot
    value: Any = None
    failure: Failure | None = None


def _located(worker_cls: type) -> type:
    """Return a subclass of ``worker_cls`` with a ``where`` method: its info plus its Ray node.

    The subclass bears the worker's own names: Ray names an actor class by its ``__qualname__``
    (``ray list actors``, the actor's handle) and titles its process and log lines after it
    (``ray::Worker.shard``), so a wrapper's name would show there instead of the worker's.
    """

    def where(self: Any) -> dict[str, object]:
        return {**self.info(), "node": ray.get_runtime_context().get_node_id()}

    names = {name: getattr(worker_cls, name) for name in ("__module__", "__qualname__", "__doc__")}
    return type(worker_cls.__name__, (worker_cls,), {**names, "where": where})


def start_actors(
    worker_cls: type, args: tuple[Any, ...], size: int, options: dict[str, Any]
) -> list[Any]:
    """Return ``size`` new actors of ``worker_cls(*args)`` with Ray ``options`` (not waited for)."""
    remote = ray.remote(max_restarts=WORKER_MAX_RESTARTS, **options)(_located(worker_cls))
    return [remote.remote(*args) for _ in range(size)]


class ActorPool:
    """A pool over ``actors`` (see :func:`start_actors`); see the module docstring.

    ``startup_timeout`` bounds the start-up and the time with no worker up during a run.
    ``owner``: :meth:`kill` kills the actors (False: a pool over actors that another process
    started and will kill, e.g. in a Ray task that shares the driver's workers).
    Thread-safe: one thread may wait in :meth:`poll` while others submit.
    """

    def __init__(self, actors: list[Any], startup_timeout: float, owner: bool = True) -> None:
        self.timeout = startup_timeout
        self.owner = owner
        self.actors = list(actors)
        self.slots = [Slot(i) for i in range(len(self.actors))]
        self.nodes: list[str | None] = [None] * len(self.actors)  # Ray node id of each worker
        self._calls: dict[Any, tuple[Any, Slot]] = {}  # ObjectRef -> (tag, slot)
        self._probes: dict[Any, Slot] = {}  # ObjectRef of where() -> worker coming back
        self._lock = threading.Lock()
        self.restarts = 0  # workers that came back after dying
        self.closed = False

    # ------------------------------------------------------------------ start-up

    def wait_started(self, too_slow: str) -> list[dict[str, Any]]:
        """Return each worker's :meth:`where` once all have started; ``too_slow`` ends the error.

        Raises ScoreCamError when one fails to start or they do not all start in time.
        """
        waiting = {self.actors[slot.index].where.remote(): slot for slot in self.slots}
        infos: list[dict[str, Any]] = [{} for _ in self.slots]
        deadline = time.monotonic() + self.timeout
        while waiting:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=max(0.0, left))
            if not ready:
                raise ScoreCamError(
                    f"{len(waiting)} of {len(self.slots)} Ray workers did not start within "
                    f"{self.timeout:g} s {too_slow}"
                )
            slot = waiting.pop(ready[0])
            try:
                infos[slot.index] = info = ray.get(ready[0])
            except (RayActorError, RayTaskError) as err:
                raise ScoreCamError(f"a Ray worker failed to start: {cause(err)}") from None
            self._located(slot, info)
            log.info(
                "worker %d: %s, %s, %s threads",
                slot.index,
                slot.where,
                info["device"],
                info["threads"],
            )
        return infos

    def call(self, method: str, *args: Any) -> Any:
        """Return ``method(*args)`` of the first worker, waiting at most the start-up timeout."""
        try:
            ref = getattr(self.actors[0], method).remote(*args)
            return ray.get(ref, timeout=self.timeout)
        except (RayActorError, RayTaskError, GetTimeoutError) as err:
            raise ScoreCamError(f"a Ray worker failed to start: {cause(err)}") from None

    def where(self, slot: Slot) -> dict[str, Any]:
        """Return the :meth:`where` of one worker, waiting while it restarts."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                info = ray.get(self.actors[slot.index].where.remote())
                self._located(slot, info)
                return info
            except ActorUnavailableError:  # restarting: Ray refuses calls for a moment
                if time.monotonic() > deadline:
                    raise ScoreCamError(
                        f"Ray worker {slot.index} did not come back within {self.timeout:g} s"
                    ) from None
                time.sleep(0.2)
            except RayActorError as err:
                raise ScoreCamError(f"Ray worker {slot.index} is gone: {cause(err)}") from None

    # ------------------------------------------------------------------ calls

    def put(self, value: Any) -> Any:
        """Return an object-store reference to ``value``, passed to calls instead of it."""
        return ray.put(value)

    def free(self, prefer: Slot | None = None) -> Slot | None:
        """Return a worker with room for a call (``prefer`` if it has), or None."""
        with self._lock:
            return pick_slot(self.slots, prefer)

    def submit(self, slot: Slot, tag: Any, method: str, *args: Any) -> None:
        """Send ``method(*args)`` to ``slot``'s worker; :meth:`poll` returns it with ``tag``."""
        with self._lock:
            ref = getattr(self.actors[slot.index], method).remote(*args)
            slot.busy += 1
            slot.sent += 1
            self._calls[ref] = (tag, slot)

    def poll(self, timeout: float = _POLL_S) -> list[Reply]:
        """Wait up to ``timeout`` s for calls or probes; return the calls that came back.

        Raises ScoreCamError when no worker is up and none came back within the start-up
        timeout (or all are gone for good).
        """
        with self._lock:
            wait_s = self._send_due_probes()
            refs = list(self._calls) + list(self._probes)
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            if not ready:
                limit = timeout if wait_s is None else min(timeout, wait_s)
                ready, _ = ray.wait(refs, num_returns=1, timeout=limit)
        else:
            time.sleep(min(timeout, wait_s if wait_s is not None else timeout))
            ready = []
        replies = []
        with self._lock:
            for ref in ready:
                if ref in self._probes:
                    self._probe_back(ref)
                elif ref in self._calls:
                    replies.append(self._collect(ref))
            if none_left(self.slots, time.monotonic(), self.timeout):
                raise ScoreCamError(self.no_worker_message())
        return replies

    def _collect(self, ref: Any) -> Reply:
        tag, slot = self._calls.pop(ref)
        slot.busy -= 1
        try:
            return Reply(tag, slot, value=ray.get(ref))
        except RayTaskError as err:
            # A ScoreCamError raised by the worker is a user mistake: the same call fails again.
            retryable = not isinstance(err.cause, ScoreCamError)
            return Reply(tag, slot, failure=Failure(cause(err), lost=False, retryable=retryable))
        except (RayActorError, ObjectLostError) as err:
            # ObjectLostError: the result lived on a node that went away with its worker.
            self._lost(slot, err)
            return Reply(tag, slot, failure=Failure(cause(err), lost=True))

    # ------------------------------------------------------------------ deaths and restarts

    def _lost(self, slot: Slot, err: Exception) -> None:
        if not slot.lost(time.monotonic()):
            return
        node = self._lost_node(slot)
        log.warning(
            "worker %d (%s) died%s: %s; its calls go to the other workers",
            slot.index,
            slot.where,
            f" with its node {node}" if node else "",
            first_line(err),
        )

    def _lost_node(self, slot: Slot) -> str | None:
        """Return ``slot``'s node as "ADDRESS (ID)" if Ray has marked it dead, else None."""
        node = self.nodes[slot.index]
        address, alive = node_table().get(node, ("", True)) if node else ("", True)
        return None if alive else f"{address} ({cast(str, node)[:8]})"  # alive if no node

    def _send_due_probes(self) -> float | None:
        """Send the probes that are due; return seconds until the next one (None: none)."""
        due, wait_s = probes_due(self.slots, time.monotonic())
        for slot in due:
            # Ray holds it while the actor restarts, or refuses it (ActorUnavailableError).
            slot.probe_at = None
            self._probes[self.actors[slot.index].where.remote()] = slot
        return wait_s

    def _probe_back(self, ref: Any) -> None:
        slot = self._probes.pop(ref)
        try:
            info = ray.get(ref)
        except (RayActorError, RayTaskError) as err:
            for_good = isinstance(err, ActorDiedError) and err.actor_init_failed
            dead = not isinstance(err, ActorUnavailableError)  # not restarting: dead
            if slot.probe_failed(time.monotonic(), dead=dead, for_good=for_good):
                log.warning("worker %d is gone: %s", slot.index, cause(err))
            return
        self._located(slot, info)
        slot.back(slot.where)
        self.restarts += 1
        log.info("worker %d is back: %s", slot.index, slot.where)

    def _located(self, slot: Slot, info: dict[str, Any]) -> None:
        self.nodes[slot.index] = info.get("node")
        slot.where = f"pid {info['pid']} on {info['host']}"

    def no_worker_message(self) -> str:
        """Return the one line of a pool that has no worker left, naming the nodes it lost."""
        table = node_table()
        known = {node: table[node] for node in self.nodes if node in table}
        lost = sorted(f"{addr} ({node[:8]})" for node, (addr, alive) in known.items() if not alive)
        ran = sorted(f"{addr} ({node[:8]})" for node, (addr, _) in known.items())
        nodes = f"; they ran on node(s) {', '.join(ran)}" if ran else ""
        if lost:
            nodes = f"; lost node(s): {', '.join(lost)}"
        return (
            f"no Ray worker is left: all {len(self.slots)} died and none came back within "
            f"{self.timeout:g} s{nodes}"
        )

    def kill(self) -> None:
        """Kill every worker (Ray does not restart them) if this pool owns them. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._calls.clear()
        self._probes.clear()
        if not self.owner or not ray.is_initialized():
            return
        for i, actor in enumerate(self.actors):
            try:
                ray.kill(actor)  # no_restart=True: Ray does not bring it back
            except Exception as err:  # already dead, or the cluster went away: nothing to free
                log.debug("could not kill worker %d: %s", i, err)


def cause(err: BaseException) -> str:
    """Return the one-line cause of a Ray error: the worker's own exception where there is one."""
    if isinstance(err, RayTaskError) and err.cause is not None:
        inner = err.cause
        if isinstance(inner, ScoreCamError):
            return first_line(inner)
        return f"{type(inner).__name__}: {first_line(inner)}"
    if isinstance(err, RayActorError) and err.actor_init_failed:
        # The creation task's traceback is in the message; its last line is the exception.
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else type(err).__name__
        name, sep, message = last.partition(": ")
        if sep and name.rsplit(".", 1)[-1] == ScoreCamError.__name__:
            return message
        return f"{name.rsplit('.', 1)[-1]}: {message}" if sep else last
    return first_line(err)
