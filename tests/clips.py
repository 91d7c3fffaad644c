"""Synthetic clips for the tests, written with PyAV directly (not with the code under test)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

W, H, FPS = 64, 48, 12
LIVE_FPS = 25  # the live sources' rate (send_mpegts, udp_source)
SAMPLE_RATE = 44100
REPO = Path(__file__).resolve().parents[1]
CLIP_FRAMES = 12  # frames of the shared `clip` fixture (conftest.py)

# A real model kept cheap: the offline EfficientNet-Lite0 at 64 px, 8 channels per frame.
FAST = [
    "--model",
    "efficientnet_lite0",
    "--input-size",
    "64",
    "--max-channels",
    "8",
    "--batch-size",
    "8",
    # Lossless: two runs' videos then differ only where their drawn pictures do (a heat value
    # on the other side of a colormap step), not by x264's look-ahead spreading that around.
    "--crf",
    "0",
    "--quiet",
]

# EfficientNet-Lite0 at 64 px with 48 channels' passes: several live frame intervals per map.
SLOW = [
    "--model",
    "efficientnet_lite0",
    "--input-size",
    "64",
    "--max-channels",
    "48",
    "--batch-size",
    "8",
    "--quiet",
]


def picture(i: int, width: int = W, height: int = H) -> np.ndarray:
    """Return a smooth test picture whose bright block moves with ``i``; top-left is marked."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 60)], axis=-1)
    left = (i * 3) % (width - 16)
    image[height // 2 : height // 2 + 12, left : left + 16] = 230
    image[:8, :8] = (255, 0, 0)  # an upright marker for the rotation tests
    return image.astype(np.uint8)


def make_clip(
    path: Path,
    count: int = 20,
    size: tuple[int, int] = (W, H),
    pts: list[int] | None = None,
    time_base: Fraction = Fraction(1, FPS),
    audio: str | None = None,
    rotation: int | None = None,
    gop: int | None = None,
) -> list[np.ndarray]:
    """Write a clip with PyAV directly (not with the code under test); return its pictures."""
    width, height = size
    pts = pts if pts is not None else list(range(count))
    images = [picture(i, width, height) for i in range(len(pts))]
    options = {"crf": "8"} | ({"g": str(gop)} if gop else {})
    with av.open(str(path), "w") as output:
        video = output.add_stream(
            "libx264", rate=FPS, width=width, height=height, time_base=time_base, options=options
        )
        if rotation is not None:
            video.set_display_rotation(rotation)
        if audio is not None:
            sound = output.add_stream(audio, rate=SAMPLE_RATE)
            sound.layout = "mono"
        for image, frame_pts in zip(images, pts, strict=True):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = frame_pts, time_base
            output.mux(video.encode(frame))
        output.mux(video.encode(None))
        if audio is not None:
            seconds = float((pts[-1] + 1) * time_base)
            tone = np.sin(2 * np.pi * 440 * np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE)
            fmt = "s16" if audio.startswith("pcm") else "fltp"
            samples = (tone * 8000).astype(np.int16) if fmt == "s16" else tone.astype(np.float32)
            chunk = 1024
            for first in range(0, len(samples), chunk):
                frame = av.AudioFrame.from_ndarray(
                    samples[None, first : first + chunk], format=fmt, layout="mono"
                )
                frame.sample_rate, frame.pts = SAMPLE_RATE, first
                frame.time_base = Fraction(1, SAMPLE_RATE)
                output.mux(sound.encode(frame))
            output.mux(sound.encode(None))
    return images


def write_frames(path: Path, images: list[np.ndarray]) -> None:
    """Write the given RGB uint8 pictures as an H.264 clip at FPS, with PyAV directly."""
    height, width = images[0].shape[:2]
    with av.open(str(path), "w") as output:
        video = output.add_stream("libx264", rate=FPS, width=width, height=height)
        video.options = {"crf": "8"}
        for i, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            output.mux(video.encode(frame))
        output.mux(video.encode(None))


def read_timing(path: Path) -> tuple[Fraction, list[int]]:
    """Return the video stream's time base and the decoded pts, read with PyAV directly."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.time_base, [frame.pts for frame in container.decode(stream)]


def audio_span(path: Path) -> tuple[str, float, float]:
    """Return the audio codec, first timestamp and length (seconds) of the first audio stream."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        packets = [p for p in container.demux(stream) if p.pts is not None]
        first = min(p.pts for p in packets)
        last = max(p.pts + p.duration for p in packets)
        return (
            stream.codec_context.name,
            float(first * stream.time_base),
            float((last - first) * stream.time_base),
        )


def free_udp_port() -> int:
    """Return a UDP port on 127.0.0.1 that nothing is bound to right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def send_mpegts(
    url: str,
    seconds: float,
    fps: int = LIVE_FPS,
    size: tuple[int, int] = (128, 96),
    stop: object | None = None,
    realtime: bool = True,
) -> int:
    """Send a synthetic clip as MPEG-TS (H.264, a keyframe every 0.5 s) to ``url``.

    Frames go out at the clip's own pace when ``realtime`` (a live source), as fast as they
    encode otherwise; ``stop`` (a threading.Event) ends it early. Returns the frames sent.
    Written with PyAV directly, not with the code under test.
    """
    import time

    width, height = size
    count = round(seconds * fps)
    began = time.monotonic()
    sent = 0
    with av.open(url, "w", format="mpegts") as output:
        stream = output.add_stream(
            "libx264",
            rate=fps,
            width=width,
            height=height,
            options={"tune": "zerolatency", "g": str(max(1, fps // 2)), "bf": "0"},
        )
        for i in range(count):
            if stop is not None and stop.is_set():  # type: ignore[attr-defined]
                break
            if realtime:
                delay = began + i / fps - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            frame = av.VideoFrame.from_ndarray(picture(i, width, height), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            output.mux(stream.encode(frame))
            sent += 1
        output.mux(stream.encode(None))
    return sent


@contextmanager
def udp_source(seconds: float) -> Iterator[tuple[str, threading.Event, list[int]]]:
    """Send a clip to a free UDP port in a thread; yield (url, stop event, [frames sent])."""
    url = f"udp://127.0.0.1:{free_udp_port()}"
    stop = threading.Event()
    sent: list[int] = []
    thread = threading.Thread(
        target=lambda: sent.append(send_mpegts(url, seconds, LIVE_FPS, stop=stop)), daemon=True
    )
    thread.start()
    try:
        yield url, stop, sent
    finally:
        stop.set()
        thread.join(timeout=30)


# --- inputs a user may give by mistake (the same builders for the reader and the CLI) --------


def text_file(directory: Path) -> Path:
    """Return a text file named like a video."""
    path = directory / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    return path


def empty_file(directory: Path) -> Path:
    """Return an empty file named like a video."""
    path = directory / "empty.mp4"
    path.write_bytes(b"")
    return path


def truncated_mp4(directory: Path, clip: Path) -> Path:
    """Return the first half of ``clip``: an mp4 whose index (moov, at the end) is lost."""
    path = directory / "cut.mp4"
    path.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    return path


def audio_only(directory: Path) -> Path:
    """Return an AAC file with no video stream."""
    path = directory / "tone.m4a"
    with av.open(str(path), "w") as output:
        stream = output.add_stream("aac", rate=SAMPLE_RATE)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 4096), np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate, frame.pts = SAMPLE_RATE, 0
        output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return path
