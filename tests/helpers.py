"""Helpers shared by the tests (clips are in clips.py, tiny models and fixtures in conftest.py).

Processes of a run read from /proc (Linux): its unnamed outputs, the records it has written, its
session; waiting for a run to be mid-way before signalling it; the single-process run a
distributed one is compared with; the per-channel Score-CAM the engine is compared with.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from clips import CLIP_FRAMES
from prometheus_client.parser import text_string_to_metric_families

from scorecam_stream.cli import main

BIN = Path(sys.executable).parent  # the venv's scripts: ray, scorecam-video
SCRIPT = BIN / "scorecam-video"


def records(path: Path) -> tuple[list[dict], dict]:
    """Return (per-frame records, summary) of a jsonl output that ends with its summary."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert "summary" in lines[-1] and all("summary" not in r for r in lines[:-1])
    return lines[:-1], lines[-1]["summary"]


def _stat_fields(stat: Path) -> list[str] | None:
    """Return the fields after the command name of a /proc/<pid>/stat file (None if gone)."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None  # gone, or read empty while it was being reaped


def process_alive(pid: int) -> bool:
    """Return whether process ``pid`` exists and is not a zombie."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return fields is not None and fields[0] != "Z"


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    """Return the pids still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(process_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if process_alive(p)]


def session_pids(sid: int) -> list[int]:
    """Return the live processes of session ``sid`` (the head and everything it started)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields is not None and int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def stop_session(process: subprocess.Popen) -> list[int]:
    """Kill ``process`` and everything in its session (e.g. a `ray start --block` and all it
    started; never `ray stop`, which stops every Ray instance on the machine); return the pids
    still alive 30 s later."""
    for pid in session_pids(process.pid):
        with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while session_pids(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return session_pids(process.pid)


def raylet_of(process: subprocess.Popen) -> int:
    """Return the pid of the raylet that a `ray start` process started."""
    for pid in session_pids(process.pid):
        program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        if program.endswith(b"/raylet"):  # not a worker, whose arguments name the raylet
            return pid
    raise AssertionError("no raylet in the node's session")


def unnamed_outputs(pid: int, directory: Path) -> list[Path]:
    """Return ``/proc/PID/fd/N`` of the unnamed files process ``pid`` writes in ``directory``.

    A run's outputs have no name until it succeeds (O_TMPFILE); this is how a test reads
    them mid-run.
    """
    found = []
    fds = Path(f"/proc/{pid}/fd")
    try:
        for fd in fds.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(f"{directory}/") and target.endswith("(deleted)"):
                found.append(fd)
    except OSError:  # the process has ended
        return []
    return found


def jsonl_lines_written(pid: int, directory: Path) -> int:
    """Return how many JSON lines process ``pid`` wrote to an unnamed file in ``directory``."""
    for fd in unnamed_outputs(pid, directory):
        try:
            data = fd.read_bytes()
        except OSError:
            continue
        if data.startswith(b'{"'):
            return data.count(b"\n")
    return 0


def sigint_as_ctrl_c() -> None:
    """Let a child process take SIGINT as Ctrl-C (a ``preexec_fn``).

    A shell that runs a job in the background (``cmd &``, as CI scripts may) starts it with
    SIGINT ignored, and Python then never turns SIGINT into KeyboardInterrupt: a test that
    sends SIGINT must not depend on how its own runner was started.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_records(
    process: subprocess.Popen,
    directory: Path,
    count: int = 1,
    timeout: float = 120.0,
    live_jsonl: Path | None = None,
) -> None:
    """Return once ``process`` has written ``count`` JSON lines (to a still unnamed file in
    ``directory``; a live run's ``live_jsonl`` is written in place): mid-run, a frame is done
    and the run is not. Fails if it ended first."""
    deadline = time.monotonic() + timeout

    def written() -> int:
        if live_jsonl is None:
            return jsonl_lines_written(process.pid, directory)
        return live_jsonl.read_bytes().count(b"\n") if live_jsonl.exists() else 0

    while written() < count:
        assert process.poll() is None, f"the run ended first: {process.communicate()}"
        assert time.monotonic() < deadline, f"fewer than {count} records in {timeout:g} s"
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a distributed run against the single-process run ---------------------------------------


def single_run(clip: Path, out: Path, options: list[str]) -> tuple[Path, Path]:
    """Return (video, maps) of the single-process run of ``clip`` with ``options``."""
    video, maps = out / "out.mp4", out / "maps.npz"
    assert main([str(clip), "-o", str(video), "--save-maps", str(maps), *options]) == 0
    return video, maps


def decoded(path: Path) -> np.ndarray:
    """Return the frames (N, H, W, 3) of a video, decoded with PyAV directly."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# Per frame, the mean absolute difference (of 255) two encodings of the same pictures stay
# under. Not bit-equality: maps equal to float rounding (thread counts differ) can put a heat
# value on the other side of a colormap step. With lossy x264 (whose rate control looks ahead)
# that spread over the frame: up to 1.25 was seen on the tests' 64 x 48 clips, so the tests'
# runs encode losslessly (clips.FAST: --crf 0). The same video one frame off differs by 1.7 or
# more (tests/test_video).
SAME_PICTURE = 1.0


def assert_same_frames(video: Path, reference: Path) -> None:
    """The two videos hold the same pictures, frame for frame (up to encoding noise)."""
    got, want = decoded(video), decoded(reference)
    assert got.shape == want.shape
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    means = diff.reshape(len(diff), -1).mean(axis=1)
    worst = int(means.argmax())
    assert means[worst] < SAME_PICTURE, f"frame {worst}: mean difference {means[worst]:.2f}"


def assert_same_run(video: Path, maps: Path, single: tuple[Path, Path], size: int = 64) -> None:
    """The maps agree with the single-process ones, the targets and the frames are the same."""
    ref_video, ref_maps = single
    got, want = np.load(maps), np.load(ref_maps)
    assert got["maps"].shape == want["maps"].shape and want["maps"].shape[-2:] == (size, size)
    assert want["maps"].max() > 0
    np.testing.assert_array_equal(got["targets"], want["targets"])
    np.testing.assert_array_equal(got["pts_seconds"], want["pts_seconds"])
    # Float rounding differs with the thread count (1 per worker here): relative to the scale.
    atol = 1e-5 * float(want["maps"].max())
    np.testing.assert_allclose(got["maps"], want["maps"], rtol=1e-5, atol=atol)
    assert len(decoded(video)) == CLIP_FRAMES
    assert_same_frames(video, ref_video)


# --- the engine against Score-CAM one channel at a time -------------------------------------

VARIANTS = [
    dict(score="softmax", channel_softmax=False, combine="normalized"),  # the article
    dict(score="logit", channel_softmax=False, combine="normalized"),
    dict(score="logit_delta", channel_softmax=False, combine="raw"),
    dict(score="softmax", channel_softmax=True, combine="normalized"),
    dict(score="logit", channel_softmax=True, combine="raw"),  # pytorch-grad-cam
]


def reference_map(
    model,
    layer,
    x,
    target,
    score="softmax",
    channel_softmax=False,
    combine="normalized",
    channels=None,
):
    """Score-CAM of one image (3, S, S), one channel at a time, as the article writes it."""
    acts = []
    handle = layer.register_forward_hook(lambda _m, _i, o: acts.append(o.detach().clone()))
    with torch.no_grad():
        base_logits = model(x[None])[0]
    handle.remove()
    a = acts[0][0]  # (K, h, w)
    size = x.shape[-2:]
    weights, values = [], []
    for k in channels if channels is not None else range(a.shape[0]):
        up = F.interpolate(a[k][None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        norm = (up - up.min()) / (up.max() - up.min() + 1e-5)
        with torch.no_grad():
            logits = model((x * norm)[None])[0]
        if score == "softmax":
            s = logits.softmax(0)[target]
        elif score == "logit":
            s = logits[target]
        else:
            s = logits[target] - base_logits[target]
        weights.append(s)
        values.append(norm if combine == "normalized" else up)
    w = torch.stack(weights)
    if channel_softmax:
        w = w.softmax(0)
    return torch.relu(sum(wk * v for wk, v in zip(w, values, strict=True)))


def assert_maps_close(ours, ref, rtol=1e-5):
    scale = max(float(ref.abs().max()), 1e-6)
    assert float((ours - ref).abs().max()) <= rtol * scale + 1e-7


# --- Prometheus metrics, scraped with a real HTTP client ---------------------------------


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Return {sample name: {labels: value}} of http://127.0.0.1:PORT/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return parse(response.read().decode())


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Return {sample name: {labels: value}} of metrics in Prometheus' text format."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def value(samples: dict, name: str, stream: str) -> float:
    """Return the value of sample ``name`` with only the label stream=``stream``."""
    return samples[name][(("stream", stream),)]
