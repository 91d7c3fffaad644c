"""Tiny seeded models and inputs shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from clips import CLIP_FRAMES, make_clip
from helpers import scrape
from torch import nn

from scorecam_stream import monitoring


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


@pytest.fixture
def last_scrape(monkeypatch) -> list[dict]:
    """Scrape the metrics once more as each run ends, over HTTP, just before its server closes."""
    seen: list[dict] = []
    close = monitoring.MetricsServer.close

    def scrape_then_close(server: monitoring.MetricsServer) -> None:
        try:
            seen.append(scrape(server.port))
        finally:
            close(server)

    monkeypatch.setattr(monitoring.MetricsServer, "close", scrape_then_close)
    return seen
