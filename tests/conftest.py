"""Tiny seeded models and inputs shared by the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from clips import make_clip
from torch import nn

CLIP_FRAMES = 12  # frames of the shared `clip` fixture


class TinyCNN(nn.Module):
    """A small seeded CNN: 3 -> 8 -> 12 channels, 10 classes; ``features.3`` is the target."""

    def __init__(self, classes: int = 10, channels: int = 12) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, channels, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def make_tiny(seed: int = 0, **kwargs) -> TinyCNN:
    """Return a seeded TinyCNN in eval mode."""
    torch.manual_seed(seed)
    return TinyCNN(**kwargs).eval()


@pytest.fixture
def tiny() -> TinyCNN:
    return make_tiny()


def seeded_frames(count: int, size: int, seed: int) -> torch.Tensor:
    """Return ``count`` seeded model inputs (count, 3, size, size), each with a bright square
    (a quarter of the side) somewhere else."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, size, size, generator=g) * 0.3
    span, side = size - 24, size // 4
    for i in range(count):
        r, c = (7 * i) % span, (11 * i + 5) % span
        x[i, :, r : r + side, c : c + side] += 1.5
    return x


@pytest.fixture
def images() -> torch.Tensor:
    """Three seeded 32 x 32 inputs with spatial structure (a bright square each)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g) * 0.3
    for i, (r, c) in enumerate([(4, 4), (16, 8), (10, 20)]):
        x[i, :, r : r + 8, c : c + 8] += 1.5
    return x


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A CLIP_FRAMES-frame clip with an AAC tone, alone in its directory (a job's working dir)."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    make_clip(path, count=CLIP_FRAMES, audio="aac")
    return path


# --- processes, read from /proc (Linux) ------------------------------------------------------


def _stat_fields(stat: Path) -> list[str] | None:
    """Return the fields after the command name of a /proc/<pid>/stat file (None if gone)."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


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
