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
import subprocess
import sys
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
        self._raylet: int | None = None  # the local raylet's pidfd, while watched
        self._watcher: subprocess.Popen[bytes] | None = None
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
        """Have one line said when the local instance's raylet dies (e.g. the OOM killer).

        Ray then ends this process itself: the first call that meets the raylet's closed socket
        (a ``ray.put``, a ``ray.wait``) calls ``_Exit`` from C++, with only Ray's own messages
        and no Python clean-up (the outputs, having no name yet, vanish with it). That socket
        closes before the raylet's exit can be seen, so no thread of this process can be sure
        to say anything first: a small watcher process, sharing this one's stderr, says it. It
        stays silent when this process closes the session first (it is sent a byte before
        Ray's shutdown stops the raylet) or dies first (its pipe ends while the raylet lives).
        """
        try:
            node = ray._private.worker.global_worker.node
            pid = node.all_processes["raylet"][0].process.pid
            self._raylet = os.pidfd_open(pid)
        except (AttributeError, KeyError, IndexError, OSError) as err:  # private API, Linux only
            log.debug("not watching the local raylet: %s", err)
            return
        message = (
            f"the local Ray instance was lost (its raylet, pid {pid}, died); no output written"
        )
        self._watcher = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHER, str(self._raylet), _stderr_line(message)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            pass_fds=(self._raylet,),  # the pidfd itself: no race with the raylet's exit
        )

    def resources(self) -> tuple[int, int]:
        """Return the cluster's (CPUs, GPUs)."""
        resources = ray.cluster_resources()
        return int(resources.get("CPU", 0)), int(resources.get("GPU", 0))

    def close(self) -> None:
        """Shut Ray down if this session started or connected it. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if (
            self._watcher is not None
            and self._watcher.stdin is not None
            and self._raylet is not None
        ):
            lost = select.select([self._raylet], [], [], 0)[0]  # died before the session closed
            with contextlib.suppress(OSError):  # the watcher already left
                if not lost:
                    self._watcher.stdin.write(b"c")
                self._watcher.stdin.close()
            self._watcher.wait()
            os.close(self._raylet)
        if self.owned and ray.is_initialized():
            ray.shutdown()


# The raylet watcher: a process of its own, so that it outlives this one. Woken by the raylet's
# exit or by its stdin (a byte: the session closed; end of file: this process is gone), it says
# its line when the raylet is gone and the session was not closed.
_WATCHER = """
import os, select, sys
raylet = int(sys.argv[1])  # the raylet's pidfd
select.select([raylet, 0], [], [])
closed = select.select([0], [], [], 0)[0] and os.read(0, 1) == b"c"
if select.select([raylet], [], [], 0)[0] and not closed:
    os.write(2, sys.argv[2].encode())
"""


def _stderr_line(message: str) -> str:
    """Return ``message`` as this module's logger would write it to stderr as an error."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), None)
    logger: logging.Logger | None = log
    while logger is not None:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                return handler.format(record) + "\n"
        logger = logger.parent if logger.propagate else None
    return message + "\n"


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
