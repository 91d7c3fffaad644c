"""The Ray session of a run: connect to a cluster or start a local instance, and shut it down.

Also what Ray does to the process that the user must not feel: it replaces the SIGTERM handler
(put back here), it retries an unreachable address for minutes (checked first here), and when
the local instance dies it ends this process from a C++ thread (said in one line here first).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import ray
from ray.exceptions import AuthenticationError

from ..config import DistributedConfig
from ..errors import ScoreCamError, first_line

log = logging.getLogger(__name__)

_CONNECT_CHECK_S = 10.0  # ray.init retries an unreachable address for minutes: look first
AUTH_HINT = (
    "with token authentication on the cluster, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to "
    "the token `ray get-auth-token` prints on its head node"
)


class RaySession:
    """This process's connection to Ray: the cluster at ``dist.address``, a new local
    instance, or the instance this process already initialised (left as it is at the end).
    """

    def __init__(self, dist: DistributedConfig) -> None:
        self.owned = False  # this object called ray.init, so close() calls ray.shutdown
        self.closed = False
        if ray.is_initialized():
            log.info("using the Ray instance this process already initialised")
            return
        if dist.address:
            self._connect(dist.address, dist.startup_timeout)
        else:
            self._start_local(dist.workers)
        self.owned = True

    def _connect(self, address: str, timeout: float) -> None:
        check_reachable(address, min(_CONNECT_CHECK_S, timeout))
        # A ray:// client passes its keyword arguments to the server's ray.init: pass none.
        quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
        kwargs = {} if address.startswith("ray://") else quiet
        try:
            with keep_sigterm_handler():
                ray.init(address=address, **kwargs)
        except AuthenticationError as err:
            raise ScoreCamError(
                f"the Ray cluster at {address} refused this process ({first_line(err)}); "
                f"{AUTH_HINT}"
            ) from None
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
            raise ScoreCamError(
                f"cannot connect to the Ray cluster at {address}: {first_line(err)}; {AUTH_HINT}"
            ) from None
        log.info("connected to the Ray cluster at %s", address)

    def _start_local(self, workers: int) -> None:
        # address="local": a new instance, whatever RAY_ADDRESS or an earlier `ray start` say.
        cpus = max(os.cpu_count() or 1, workers)
        with keep_sigterm_handler():
            # A private instance: Ray's own start-up notices (e.g. its token set-up) say nothing
            # the user can act on, so only its errors are shown.
            ray.init(
                address="local",
                num_cpus=cpus,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
        log.info("started a local Ray instance with %d CPUs", cpus)
        self._watch_local_raylet()

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
            if not self.closed:
                log.error(
                    "the local Ray instance was lost (its raylet, pid %d, died); no output written",
                    pid,
                )
            os.close(pidfd)

        threading.Thread(target=watch, daemon=True, name="raylet-watch").start()

    def resources(self) -> tuple[int, int]:
        """Return the cluster's (CPUs, GPUs)."""
        resources = ray.cluster_resources()
        return int(resources.get("CPU", 0)), int(resources.get("GPU", 0))

    def close(self) -> None:
        """Shut Ray down if this session started or connected it. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.owned and ray.is_initialized():
            ray.shutdown()


def node_table() -> dict[str, tuple[str, bool]]:
    """Return {node id: (address, alive)} of every node the cluster has known."""
    try:
        nodes = ray.nodes()
    except Exception as err:  # the cluster itself went away: nothing more to say
        log.debug("cannot list the Ray nodes: %s", err)
        return {}
    return {n["NodeID"]: (n.get("NodeManagerAddress", "?"), bool(n.get("Alive"))) for n in nodes}


@contextlib.contextmanager
def keep_sigterm_handler() -> Iterator[None]:
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


def check_reachable(address: str, timeout: float) -> None:
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


def describe_options(options: dict[str, Any]) -> str:
    """Return what one actor needs, e.g. ``1 CPU and 0.5 GPU``."""
    names = {"num_cpus": "CPU", "num_gpus": "GPU"}
    return " and ".join(f"{options[k]} {name}" for k, name in names.items() if k in options)
