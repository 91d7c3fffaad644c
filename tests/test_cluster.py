"""scorecam-video on Ray from the command line: --workers N, a real cluster job, signals.

The runs compare with the single-process run of the same command: the maps (npz) agree to float
rounding, the targets and the encoded frames are the same. The cluster test starts its own head
(``ray start --head --block``, token authentication on, its own temp dir and ports), submits the
command with ``ray job submit`` as the README says, and stops that head by its process id. Ctrl-C
and SIGTERM mid-run leave no output and no process behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from clips import CLIP_FRAMES, FAST, REPO
from helpers import (
    BIN,
    assert_same_run,
    free_port,
    raylet_of,
    session_pids,
    sigint_as_ctrl_c,
    single_run,
    stop_session,
    wait_for_records,
)

from scorecam_stream.cli import main
from scorecam_stream.video import probe

pytestmark = pytest.mark.slow  # every test starts Ray (a local instance, a head or nodes)


@pytest.fixture(scope="module")
def single(clip, tmp_path_factory) -> tuple[Path, Path]:
    return single_run(clip, tmp_path_factory.mktemp("single"), FAST)


@pytest.mark.parametrize(
    ("options", "shape"),
    [
        ([], (CLIP_FRAMES, 64, 64)),
        # the batched classification of every frame first, and frames passed through
        (["--target", "dominant", "--every", "3"], (4, 64, 64)),
        (["--topk", "2"], (CLIP_FRAMES, 2, 64, 64)),
    ],
    ids=["top1", "dominant-every-3", "topk-2"],
)
def test_workers_give_the_single_process_output(clip, single, tmp_path, options, shape):
    assert not ray.is_initialized()
    if options:
        ref_video, ref_maps = tmp_path / "ref.mp4", tmp_path / "ref.npz"
        ref = [str(clip), "-o", str(ref_video), "--save-maps", str(ref_maps), *FAST, *options]
        assert main(ref) == 0
        single = (ref_video, ref_maps)
    assert np.load(single[1])["maps"].shape == shape
    video, maps = tmp_path / "out.mp4", tmp_path / "maps.npz"
    args = [str(clip), "-o", str(video), "--save-maps", str(maps), *FAST, *options]
    assert main([*args, "--workers", "2", "--shards-per-frame", "3"]) == 0
    assert not ray.is_initialized()  # the local instance it started is shut down
    assert_same_run(video, maps, single)


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """Start a token-auth head node; yield (dashboard address, environment for the CLI)."""
    temp = Path(f"/tmp/scs-ray-{secrets.token_hex(3)}")  # short: socket paths are limited
    dashboard = free_port()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    }
    # fmt: off
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(temp),
        "--port", str(free_port()), "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard), "--include-dashboard", "true",
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
    ]
    # fmt: on
    log = tmp_path_factory.mktemp("head") / "head.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(address, env["RAY_AUTH_TOKEN"], process, log)
        yield address, env
    finally:
        # The head and all it started share its session; it has nothing to drain: kill them all.
        assert stop_session(process) == []
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_dashboard(address: str, token: str, process: subprocess.Popen, log: Path) -> None:
    """Return once the dashboard answers an authenticated request (fail after 90 s)."""
    request = urllib.request.Request(
        f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ray start exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"the Ray dashboard did not come up in 90 s:\n{log.read_text()}")


def submit(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``ray job submit``; again while the head's job agent is still starting (a fresh head)."""
    for _ in range(5):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent to submit job" not in done.stdout + done.stderr:
            break
        time.sleep(3)
    return done


def test_ray_job_submit_with_token_auth(head, clip, single, tmp_path):
    address, env = head
    video, maps = tmp_path / "out.mp4", tmp_path / "maps.npz"
    # The README's command. The input is relative to the uploaded working dir; the outputs are
    # absolute paths (the entrypoint runs on the head node, here this machine).
    # fmt: off
    command = [
        str(BIN / "ray"), "job", "submit", "--address", address,
        "--working-dir", str(clip.parent), "--entrypoint-num-cpus", "0", "--",
        "scorecam-video", clip.name, "-o", str(video), "--save-maps", str(maps),
        "--workers", "2", "--address", "auto", *FAST,
    ]
    # fmt: on
    done = submit(command, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "succeeded" in done.stdout + done.stderr
    assert probe(str(video)).frame_count == CLIP_FRAMES
    assert_same_run(video, maps, single)

    # scripts/submit_job.py: the same job through JobSubmissionClient, following its logs.
    video2, maps2 = tmp_path / "out2.mp4", tmp_path / "maps2.npz"
    script = [sys.executable, str(REPO / "scripts" / "submit_job.py"), "--address", address]
    script += ["--working-dir", str(clip.parent), "--", clip.name, "-o", str(video2)]
    script += ["--save-maps", str(maps2), "--workers", "2", "--address", "auto", *FAST]
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(": SUCCEEDED (Job finished successfully.)")
    assert_same_run(video2, maps2, single)

    # A whole set in one job: two videos of the working dir, the workers started once.
    videos = tmp_path / "set"
    videos.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(clip, videos / name)
    out, maps_dir = tmp_path / "set-out", tmp_path / "set-maps"
    # fmt: off
    batch = [
        str(BIN / "ray"), "job", "submit", "--address", address,
        "--working-dir", str(videos), "--entrypoint-num-cpus", "0", "--",
        "scorecam-video", "a.mp4", "b.mp4", "-o", f"{out}/", "--save-maps", f"{maps_dir}/",
        "--workers", "2", "--address", "auto", *FAST,
    ]
    # fmt: on
    done = submit(batch, env)
    assert done.returncode == 0, done.stdout + done.stderr
    for stem in ("a", "b"):
        assert_same_run(out / f"{stem}.scorecam.mp4", maps_dir / f"{stem}.maps.npz", single)

    # Without the token the cluster refuses the job, and the message says why.
    refused = dict(env, RAY_AUTH_TOKEN="0" * 32)
    done = subprocess.run(command, env=refused, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "auth" in (done.stdout + done.stderr).lower()


@pytest.mark.parametrize(
    ("signum", "code", "workers"),
    [(signal.SIGINT, 130, "1"), (signal.SIGTERM, 143, "1"), (signal.SIGTERM, 143, "0")],
    ids=["ctrl-c-ray", "sigterm-ray", "sigterm-in-process"],
)
def test_signal_mid_run_stops_everything_and_writes_nothing(clip, tmp_path, signum, code, workers):
    out, records = tmp_path / "out.mp4", tmp_path / "records.jsonl"
    out.write_bytes(b"precious")
    script = BIN / "scorecam-video"
    args = [str(clip), "-o", str(out), "--overwrite", "--jsonl", str(records)]
    args += ["--model", "efficientnet_lite0", "--input-size", "128", "--workers", workers]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(
        [str(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its session holds it and the Ray instance it starts
        preexec_fn=sigint_as_ctrl_c,
    )
    try:
        wait_for_records(process, tmp_path)  # mid-run: a frame is done, the run is not
        assert session_pids(process.pid)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == code, stderr
    assert stderr.strip().splitlines()[-1].endswith("; no output written")
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    deadline = time.monotonic() + 30
    while session_pids(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_pids(process.pid) == []  # no Ray process left behind


def test_local_ray_instance_lost_mid_run_leaves_nothing(clip, tmp_path):
    """The local raylet killed (as the OOM killer would): Ray ends this process; no file stays.

    Ray's C++ core ends the driver (``_Exit``) at its first call that meets the dead raylet's
    socket, which can come before any thread of the driver runs again: the one line comes from
    the session's watcher process, which outlives the driver.
    """
    out, records = tmp_path / "out.mp4", tmp_path / "records.jsonl"
    args = [str(clip), "-o", str(out), "--jsonl", str(records), "--save-maps", "m.npz"]
    args += ["--model", "efficientnet_lite0", "--input-size", "128", "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(
        [str(BIN / "scorecam-video"), *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_records(process, tmp_path)
        os.kill(raylet_of(process), signal.SIGKILL)  # the raylet only, not what names it
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for pid in session_pids(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert process.returncode != 0, stderr
    ours = [line for line in stderr.splitlines() if line.startswith("scorecam-video: ERROR")]
    assert ours == [ours[0]] and "local Ray instance was lost" in ours[0], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
