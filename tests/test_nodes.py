"""A real multi-node Ray cluster on this machine: a worker's node is lost mid-run.

A head (no CPUs of its own, so no worker lands there) and worker nodes of one CPU each, all
with token authentication, their own ports and temp dir, each stopped by process id (never
``ray stop``, which stops every Ray instance on the machine). ``scorecam-video --address
--workers 2`` puts one worker on each node; a node's raylet is killed once the first frame is
out. With a node left, the run completes with the single-process maps; with none left, it
stops with exit 2 and one line naming the lost nodes, and writes nothing.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    BIN,
    assert_same_run,
    free_port,
    raylet_of,
    single_run,
    stop_session,
    wait_for_records,
)

pytestmark = pytest.mark.slow  # every test starts Ray (a local instance, a head or nodes)

# Slow enough that the kill lands mid-run (about 256 passes per frame), cheap enough for CI.
OPTIONS = ["--model", "efficientnet_lite0", "--input-size", "96", "--max-channels", "256"]
OPTIONS += ["--batch-size", "32"]


@pytest.fixture(scope="module")
def single_slow(clip, tmp_path_factory) -> tuple[Path, Path]:
    return single_run(clip, tmp_path_factory.mktemp("single-slow"), OPTIONS)


class Cluster:
    """A head node and worker nodes started with `ray start --block`, each in its own session."""

    def __init__(self, logs: Path) -> None:
        self.temp = Path(f"/tmp/scs-nodes-{secrets.token_hex(3)}")  # short: socket paths
        self.logs = logs
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        self.processes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *args: str) -> subprocess.Popen:
        # fmt: off
        command = [
            str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--num-gpus", "0",
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port()), *args,
        ]
        # fmt: on
        log = self.logs / f"node{len(self.processes)}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                command, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.processes.append(process)
        return process

    def head(self) -> None:
        self.start(
            "--head", "--num-cpus", "0", "--port", str(self.port), "--temp-dir", str(self.temp),
            "--include-dashboard", "false", "--ray-client-server-port", str(free_port()),
        )  # fmt: skip

    def nodes(self, count: int) -> list[subprocess.Popen]:
        """Start ``count`` worker nodes of one CPU, one after the other (two starting at once
        on one machine may not both join); return their `ray start` processes."""
        started = []
        for n in range(1, count + 1):
            started.append(self.start("--address", self.address, "--num-cpus", "1"))
            self._wait_for_cpus(n)
        return started

    def _wait_for_cpus(self, count: int) -> None:
        """Return once the cluster has ``count`` CPUs (`ray status` lists them)."""
        deadline = time.monotonic() + 120
        status = ""
        while time.monotonic() < deadline:
            done = subprocess.run(
                [str(BIN / "ray"), "status", "--address", self.address],
                env=self.env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            status = done.stdout + done.stderr
            if f"/{count}.0 CPU" in status:
                return
            time.sleep(1)
        pytest.fail(f"{count} nodes did not join in 120 s:\n{status}")

    def close(self) -> None:
        for process in reversed(self.processes):
            stop_session(process)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("nodes"))
    try:
        cluster.head()
        yield cluster
    finally:
        cluster.close()


def run_and_lose(
    cluster: Cluster, clip: Path, out: Path, lose: list[subprocess.Popen]
) -> subprocess.CompletedProcess:
    """Run the CLI on the cluster; kill the raylets of ``lose`` once a frame is out."""
    video, maps, records = out / "out.mp4", out / "maps.npz", out / "records.jsonl"
    args = [str(clip), "-o", str(video), "--save-maps", str(maps), "--jsonl", str(records)]
    args += [*OPTIONS, "--workers", "2", "--address", cluster.address]
    args += ["--startup-timeout", "20"]
    process = subprocess.Popen(
        [str(BIN / "scorecam-video"), *args],
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_records(process, out, timeout=180)
        for node in lose:
            os.kill(raylet_of(node), signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_a_lost_node_s_shards_go_to_the_other_node(cluster, clip, single_slow, tmp_path):
    _, second = cluster.nodes(2)
    done = run_and_lose(cluster, clip, tmp_path, [second])
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "died" in line]
    assert warnings and "its calls go to the other workers" in warnings[0], done.stderr
    assert_same_run(tmp_path / "out.mp4", tmp_path / "maps.npz", single_slow, size=96)


def test_every_node_lost_is_one_line_exit_2_and_nothing_written(cluster, clip, tmp_path):
    done = run_and_lose(cluster, clip, tmp_path, cluster.nodes(2))
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("scorecam-video: error: no Ray worker is left: all 2 died"), last
    # both nodes named, by address and node id
    assert re.search(r"; lost node\(s\): ([\d.]+ \([0-9a-f]{8}\)(, |$)){2}", last), last
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary file
