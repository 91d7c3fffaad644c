"""Whole jobs as Ray tasks on any node of the cluster (e.g. one video's decode -> encode loop).

:func:`run_tasks` runs a function over items as Ray tasks, a bounded number at once, spread
over the nodes, and yields each outcome as it finishes: its value, or the exception that ended
it (so one failed item does not stop the others). The function must be importable where the
tasks run (a module of an installed package), and the paths it reads and writes must be
reachable from every node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from ..errors import ScoreCamError
from .pool import cause

log = logging.getLogger(__name__)


def run_tasks(
    fn: Callable[..., Any], items: Sequence[Any], max_inflight: int, shared: tuple[Any, ...] = ()
) -> Iterator[tuple[int, Any, BaseException | None]]:
    """Yield ``(index, value, None)`` or ``(index, None, error)`` of ``fn(*shared, item)`` for
    each item, as each finishes (``shared`` is stored once, not sent with every task).

    At most ``max_inflight`` tasks run at once. A task asks for no CPU of its own (the
    workers' actors hold the cluster's CPUs and GPUs; a video's loop mostly waits for them)
    and is spread over the nodes (``SPREAD``), so decoding and encoding do not all sit on the
    driver's machine. An exception inside ``fn`` comes back as itself (a
    :class:`~scorecam_stream.errors.ScoreCamError` stays one); a task lost with its node as a
    ScoreCamError. Leaving early (an error, Ctrl-C) cancels the tasks still running.
    """
    if max_inflight < 1:
        raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
    remote = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy="SPREAD")(fn)
    common = [ray.put(value) for value in shared]
    running: dict[Any, int] = {}
    pending = iter(enumerate(items))
    try:
        while True:
            while len(running) < max_inflight:
                nxt = next(pending, None)
                if nxt is None:
                    break
                running[remote.remote(*common, nxt[1])] = nxt[0]
            if not running:
                return
            ready, _ = ray.wait(list(running), num_returns=1)
            index = running.pop(ready[0])
            try:
                yield index, ray.get(ready[0]), None
            except RayTaskError as err:
                inner = err.cause
                yield (
                    index,
                    None,
                    inner if isinstance(inner, Exception) else ScoreCamError(cause(err)),
                )
            except RayError as err:  # the task's process or node went away
                yield index, None, ScoreCamError(f"its Ray task was lost: {cause(err)}")
    finally:
        for ref in running:
            try:
                ray.cancel(ref, force=True)
            except Exception as err:  # already finished, or the cluster went away
                log.debug("could not cancel a task: %s", err)
